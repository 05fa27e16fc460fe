from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from client.data import fingerprint, load_table, save_table, split_site
from client.site import resolve_site_data
from fedvault.errors import ConfigError, DataError
from fedvault.tasks import Table, get_task
from protocols.config import RunSettings


def _write(p: Path, text: str) -> Path:
    p.write_text(text, encoding="utf-8")
    return p


def test_csv_roundtrip(tmp_path: Path) -> None:
    t = Table(x=np.arange(12, dtype=np.float32).reshape(4, 3) / 7, y=np.array([0, 1, 1, 0]))
    p = save_table(t, tmp_path / "d.csv", label_column="target")
    back = load_table(p, label_column="target")
    assert np.allclose(back.x, t.x) and np.array_equal(back.y, t.y)


def test_csv_label_column_anywhere(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", "y,a,b\n1,0.5,2\n0,1.5,3\n")
    t = load_table(p, label_column="y")
    assert t.x.tolist() == [[0.5, 2.0], [1.5, 3.0]] and t.y.tolist() == [1, 0]


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no label column 'label'; columns are a, b"):
        load_table(p, label_column="label")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a,label\nx,1\n", r"column 'a', row 1: 'x' is not a number"),
        ("a,label\n1,cat\n", r"label column 'label' must hold integers; row 1 has 'cat'"),
        ("a,label\n1,0.5\n", r"must hold integers"),
        ("a,label\n1,2,3\n", r"row 1 has 3 fields; the header has 2"),
        ("a,label\nnan,1\n", r"NaN or infinite"),
        ("a,label\n", r"holds no rows"),
        ("", r"empty"),
        ("label\n1\n", r"no feature columns"),
    ],
)
def test_bad_csv_gives_clear_error(tmp_path: Path, text: str, pattern: str) -> None:
    p = _write(tmp_path / "d.csv", text)
    with pytest.raises(DataError, match=pattern):
        load_table(p, label_column="label")


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "missing.csv", label_column="label")
    with pytest.raises(DataError, match="is not a file"):
        load_table(tmp_path, label_column="label")
    with pytest.raises(DataError, match=r"unsupported format '\.txt'"):
        load_table(_write(tmp_path / "d.txt", "x"), label_column="label")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_table(_write(tmp_path / "d.npz", "garbage"), label_column="label")


def test_npz(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((3, 2)), y=np.array([0, 1, 0]))
    t = load_table(p, label_column="ignored")
    assert t.x.shape == (3, 2) and t.y.tolist() == [0, 1, 0]
    np.savez(p, a=np.ones(3))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_table(p, label_column="label")


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"f": [0.1, 0.2], "label": [1, 0]}), p)
    t = load_table(p, label_column="label")
    assert t.y.tolist() == [1, 0]
    with pytest.raises(DataError, match="no label column 'y'"):
        load_table(p, label_column="y")


def test_fingerprint_follows_content_not_path(tmp_path: Path) -> None:
    t = get_task("tabular").embedded().subset(np.arange(50))
    a = save_table(t, tmp_path / "a.csv")
    b = tmp_path / "elsewhere" / "b.csv"
    b.parent.mkdir()
    shutil.copy(a, b)
    fa = fingerprint(load_table(a, label_column="label"))
    assert fa == fingerprint(load_table(b, label_column="label"))
    lines = b.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[0], "123.0", 1)
    b.write_text("\n".join(lines) + "\n")
    assert fingerprint(load_table(b, label_column="label")) != fa


def test_site_split_is_disjoint() -> None:
    t = get_task("digits").embedded().subset(np.arange(200))
    train, val = split_site(t, seed=0)
    assert len(train) + len(val) == 200 and len(val) > 0


def test_site_data_from_node_config(tmp_path: Path) -> None:
    settings = RunSettings(task="tabular")
    t = get_task("tabular").embedded().subset(np.arange(100))
    p = save_table(t, tmp_path / "site.csv", label_column="diagnosis")
    site = resolve_site_data(settings, {"data-path": str(p), "label-column": "diagnosis"})
    assert len(site.train) + len(site.validation) == 100
    # standardised per site
    assert abs(float(site.train.x.mean())) < 0.2


def test_site_without_data_is_told_how_to_fix_it() -> None:
    with pytest.raises(DataError, match="set data-path in the SuperNode's node config"):
        resolve_site_data(RunSettings(), {})


def test_site_refuses_another_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serves task 'tabular'"):
        resolve_site_data(RunSettings(task="digits"), {"task": "tabular", "data-path": "x"})


def test_site_partition_of_embedded_data() -> None:
    s = RunSettings(partitioner="iid")
    sizes = [len(resolve_site_data(s, {"partition-id": i, "num-partitions": 4}).train)
             for i in range(4)]
    assert min(sizes) > 250
    with pytest.raises(ConfigError, match=r"partition-id must be in \[0, 3\]"):
        resolve_site_data(s, {"partition-id": 4, "num-partitions": 4})

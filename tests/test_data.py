from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from client.data import load_table, save_table, split_site, table_fingerprint
from client.site_data import resolve_site_data
from fedvault_tasks.tasks import Table, get_task
from protocols.config import RunSettings
from protocols.errors import ConfigError, DataError, TaskError
from protocols.node_config import NodeConfig


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
    fa = table_fingerprint(load_table(a, label_column="label"))
    assert fa == table_fingerprint(load_table(b, label_column="label"))
    lines = b.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[0], "123.0", 1)
    b.write_text("\n".join(lines) + "\n")
    assert table_fingerprint(load_table(b, label_column="label")) != fa


def _node(config: dict[str, object], sim: bool = False) -> NodeConfig:
    return NodeConfig.parse(config, simulated=sim)


KEY = b"k" * 32


def test_site_split_is_disjoint() -> None:
    t = get_task("digits").embedded().subset(np.arange(200))
    train, val = split_site(t, key=KEY)
    assert len(train) + len(val) == 200 and 20 < len(val) < 60


def _rows(t: Table) -> set[bytes]:
    return {t.x[i].tobytes() + t.y[i].tobytes() for i in range(len(t))}


@pytest.mark.parametrize("task_name", ["digits", "tabular"])
def test_one_record_changes_no_other_records_features_or_split(tmp_path: Path,
                                                                task_name: str) -> None:
    # Neighbouring tables must stay neighbouring training sets: removing or replacing
    # one record moves no other record across the split and rescales no other record.
    task = get_task(task_name)
    full = task.embedded().subset(np.arange(300))
    target = 17
    removed = full.subset(np.delete(np.arange(300), target))
    x2 = full.x.copy()
    x2[target] = x2[target] * 3 + 5  # an outlier replaces the record
    replaced = Table(x=x2, y=full.y.copy())
    settings = RunSettings(task=task_name)
    sites = []
    for i, t in enumerate((full, removed, replaced)):
        p = save_table(t, tmp_path / f"t{i}.npz")
        sites.append(resolve_site_data(settings, _node({"data-path": str(p)}), key=KEY))
    base_tr, base_va = _rows(sites[0].train), _rows(sites[0].validation)
    for other in sites[1:]:
        tr, va = _rows(other.train), _rows(other.validation)
        # every other record is identical, feature for feature, and on the same side:
        # only the target's old and new rows differ
        changed = len(tr ^ base_tr) + len(va ^ base_va)
        assert 1 <= changed <= 2, changed


def test_split_is_unpredictable_without_the_sites_key() -> None:
    t = get_task("digits").embedded().subset(np.arange(300))
    a, _ = split_site(t, key=b"a" * 32)
    b, _ = split_site(t, key=b"b" * 32)
    assert _rows(a) != _rows(b)


def test_site_data_from_node_config(tmp_path: Path) -> None:
    settings = RunSettings(task="tabular")
    t = get_task("tabular").embedded().subset(np.arange(100))
    p = save_table(t, tmp_path / "site.csv", label_column="diagnosis")
    site = resolve_site_data(settings, _node({"data-path": str(p),
                                                  "label-column": "diagnosis"}), key=KEY)
    assert len(site.train) + len(site.validation) == 100
    # scaled to the declared (documented) bounds, never the table's own statistics
    assert float(site.train.x.min()) >= -1.0 and float(site.train.x.max()) <= 1.0


def test_tabular_site_without_declared_bounds_is_told_to_declare_them(tmp_path: Path) -> None:
    t = Table(x=np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32),
              y=np.arange(50) % 2)
    p = save_table(t, tmp_path / "site.npz")
    settings = RunSettings(task="tabular", num_features=4)
    with pytest.raises(TaskError, match="feature-bounds"):
        resolve_site_data(settings, _node({"data-path": str(p)}), key=KEY)
    site = resolve_site_data(settings, _node({"data-path": str(p),
                                                  "feature-bounds": "-3:3"}), key=KEY)
    assert float(np.abs(site.train.x).max()) <= 1.0
    bad = tmp_path / "b.json"
    bad.write_text('{"low": [0, 0], "high": [1, 1]}')
    with pytest.raises(ConfigError, match="declares 2 features"):
        resolve_site_data(settings, _node({"data-path": str(p), "feature-bounds": str(bad)}),
                          key=KEY)


def test_fingerprint_ignores_row_and_column_order() -> None:
    t = get_task("tabular").embedded().subset(np.arange(120))
    rng = np.random.default_rng(1)
    rows = rng.permutation(120)
    cols = rng.permutation(t.num_features)
    shuffled = Table(x=t.x[rows][:, cols], y=t.y[rows])
    assert table_fingerprint(shuffled) == table_fingerprint(t)
    changed = Table(x=t.x.copy(), y=t.y.copy())
    changed.x[3, 4] = np.nextafter(changed.x[3, 4], np.float32(np.inf))
    assert table_fingerprint(changed) != table_fingerprint(t)


def test_site_without_data_is_told_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match="node-config 'data-path' is missing"):
        NodeConfig.parse({})


def test_site_refuses_another_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serves task 'tabular'"):
        resolve_site_data(RunSettings(task="digits"),
                          _node({"task": "tabular", "data-path": "x"}), key=KEY)


def test_site_partition_of_embedded_data() -> None:
    s = RunSettings(partitioner="iid")
    sizes = [len(resolve_site_data(s, _node({"partition-id": i, "num-partitions": 4}, sim=True),
                                   key=KEY).train)
             for i in range(4)]
    assert min(sizes) > 250
    with pytest.raises(ConfigError, match=r"partition-id must be in \[0, 3\]"):
        resolve_site_data(s, _node({"partition-id": 4, "num-partitions": 4}, sim=True),
                          key=KEY)


def test_a_deployment_evaluates_centrally_only_on_the_central_teams_own_data(
        tmp_path: Path) -> None:
    """The embedded scikit-learn data says nothing about a real federation's data: a
    deployment without ``central-test-path`` does no central evaluation (a simulation
    still uses its held-out split); with one, it scores on that table."""
    from fedvault_tasks.datasets import central_test_table
    from fedvault_tasks.tables import save_table
    from fedvault_tasks.tasks import embedded_split, get_task
    from protocols.config import RunSettings

    task = get_task("digits")
    assert central_test_table(task, RunSettings(), deployment=True) is None
    assert central_test_table(task, RunSettings(central_eval=False)) is None
    held_out = central_test_table(task, RunSettings())
    assert held_out is not None and len(held_out) > 100
    _, test = embedded_split(task, seed=0)
    own = save_table(test.subset(np.arange(40)), tmp_path / "mine.csv",
                     label_column=task.default_label_column)
    mine = central_test_table(task, RunSettings(central_test_path=str(own)), deployment=True)
    assert mine is not None and len(mine) == 40

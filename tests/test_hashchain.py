from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from protocols.errors import IntegrityError
from protocols.hashchain import GENESIS_HASH, HashChainLog, read_chain, verify_chain


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = HashChainLog(tmp_path / "events.jsonl")
    for i in range(n):
        log.append("thing", index=i, payload={"x": i * 1.5, "name": f"n{i}"})
    return log.path


def _lines(p: Path) -> list[str]:
    return p.read_text(encoding="utf-8").splitlines(keepends=True)


def test_valid_chain(tmp_path: Path) -> None:
    p = _log(tmp_path)
    r = verify_chain(p)
    assert r.ok and r.entries == 5
    entries = read_chain(p)
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert [e["seq"] for e in entries] == list(range(5))
    assert all(entries[i]["prev_hash"] == entries[i - 1]["hash"] for i in range(1, 5))


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    p = _log(tmp_path, 3)
    log = HashChainLog(p)
    log.append("more")
    assert verify_chain(p).entries == 4


def test_edited_entry_is_named(tmp_path: Path) -> None:
    p = _log(tmp_path)
    lines = _lines(p)
    e = json.loads(lines[2])
    e["payload"]["x"] = 999
    lines[2] = json.dumps(e) + "\n"
    p.write_text("".join(lines))
    r = verify_chain(p)
    assert not r.ok and r.first_bad_line == 3 and "edited" in r.reason


def _delete_second(lines: list[str]) -> None:
    del lines[1]


def _swap_second_and_fourth(lines: list[str]) -> None:
    lines[1], lines[3] = lines[3], lines[1]


@pytest.mark.parametrize("tamper", [_delete_second, _swap_second_and_fourth],
                         ids=["deleted", "reordered"])
def test_deleted_or_reordered_entry_is_named(tmp_path: Path, tamper: Callable[[list[str]], None]
                                             ) -> None:
    p = _log(tmp_path)
    lines = _lines(p)
    tamper(lines)
    p.write_text("".join(lines))
    r = verify_chain(p)
    assert not r.ok and r.first_bad_line == 2


def test_recomputed_hash_still_breaks_the_link(tmp_path: Path) -> None:
    from protocols.hashchain import canonical_json, entry_hash

    p = _log(tmp_path)
    lines = _lines(p)
    e = json.loads(lines[1])
    e["payload"]["x"] = -1
    e["hash"] = entry_hash(e)  # a forger recomputes this entry's hash...
    lines[1] = canonical_json(e) + "\n"
    p.write_text("".join(lines))
    r = verify_chain(p)  # ...but the next entry still links to the old one
    assert not r.ok and r.first_bad_line == 3


def test_torn_last_line_is_reported_and_not_extended(tmp_path: Path) -> None:
    p = _log(tmp_path)
    with p.open("ab") as fh:
        fh.write(b'{"seq": 5, "ti')
    r = verify_chain(p)
    assert not r.ok and r.first_bad_line == 6 and r.defect == "torn" and "torn" in r.reason
    with pytest.raises(IntegrityError, match="refusing to extend a broken log"):
        HashChainLog(p)
    with pytest.raises(IntegrityError):
        read_chain(p)


def test_reserved_fields_and_nan_are_refused(tmp_path: Path) -> None:
    log = HashChainLog(tmp_path / "l.jsonl")
    with pytest.raises(ValueError, match="set by the log itself"):
        log.append("x", hash="abc")
    with pytest.raises(ValueError):
        log.append("x", value=float("nan"))
    assert verify_chain(log.path).entries == 0


def test_secret_mode(tmp_path: Path) -> None:
    log = HashChainLog(tmp_path / "secret.jsonl", mode=0o600)
    log.append("x")
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="no such log file"):
        verify_chain(tmp_path / "nope.jsonl")

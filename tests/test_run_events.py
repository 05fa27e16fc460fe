"""The kinds of hash-chained log records (protocols/run_events.py): written and read only
through their enums, and every kind written to disk is the enum's string."""

from __future__ import annotations

import re
from pathlib import Path

from protocols.hashchain import HashChainLog, read_chain
from protocols.run_events import ApprovalEvent, IncidentEvent, ReleaseEvent, RunEvent
from tests.helpers import ROOT

ALL_KINDS = [*RunEvent, *ReleaseEvent, *IncidentEvent, *ApprovalEvent]


def test_no_event_kind_literal_outside_its_enum() -> None:
    kinds = re.compile(r'"(' + "|".join(k.value for k in ALL_KINDS) + r')"')
    offenders = []
    for pkg in ("client", "server", "simulations", "fedvault", "privacy", "protocols"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "run_events.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in kinds.finditer(line.split("#", 1)[0]):
                    # a summary *column* may share a kind's name: a key followed by ':'
                    if line[m.end():].lstrip().startswith(":"):
                        continue
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert offenders == [], "\n".join(offenders)


def test_a_kind_is_written_as_its_string(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    HashChainLog(log).append(RunEvent.ROUND_SKIPPED, round=1)
    (entry,) = read_chain(log)
    assert entry["kind"] == "round_skipped" and type(entry["kind"]) is str


def test_the_kinds_are_distinct_across_logs() -> None:
    values = [k.value for k in ALL_KINDS]
    assert len(values) == len(set(values))


def test_the_documented_event_list_is_the_enum() -> None:
    """docs/reference/files.md lists the run's event kinds: exactly RunEvent's."""
    text = (ROOT / "docs" / "reference" / "files.md").read_text(encoding="utf-8")
    listed = text.split("<!-- run-events -->", 1)[1].split("<!-- /run-events -->", 1)[0]
    assert re.findall(r"`([a-z_]+)`", listed) == [k.value for k in RunEvent]

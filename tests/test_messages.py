"""The site↔server messages (protocols/messages.py): each type round-trips through the
records Flower carries, a hostile field is rejected by name, and no record name or
request key of these messages is spelled as a literal outside that module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from protocols.errors import ConfigError, UpdateRejected
from protocols.messages import (
    CONFIG,
    Declined,
    EvalConfig,
    EvalMetrics,
    GlobalRefused,
    Refusal,
    ReplyPrivacy,
    TrainConfig,
    TrainMetrics,
)
from tests.helpers import ROOT

DEFAULTS = TrainConfig(local_epochs=8, batch_size=256, learning_rate=0.3, momentum=0.9)


def test_every_message_round_trips() -> None:
    refusal = Refusal(reason="budget", site="a", epsilon_limit=8.0, delta=1e-5,
                      epsilon_spent=7.5)
    assert Refusal.from_content(refusal.to_content()) == refusal
    bare = Refusal(reason="app not approved", site="b")  # the site runtime's refusal
    assert Refusal.from_content(bare.to_content()) == bare
    refused = GlobalRefused(reason="moved too far", site="a", version=3)
    assert GlobalRefused.from_content(refused.to_content()) == refused
    declined = Declined(reason="no release")
    assert Declined.from_content(declined.to_content()) == declined
    ev = EvalMetrics(num_examples=10, loss=0.5, accuracy=0.9)
    assert EvalMetrics.from_content(ev.to_content(), max_examples=10) == ev
    tm = TrainMetrics(num_examples=100, steps=4)
    content = RecordDict({"metrics": tm.to_record()})
    assert TrainMetrics.from_content(content, max_examples=100) == tm
    pr = ReplyPrivacy(site="a", epsilon=1.0, delta=1e-5, accountant="prv",
                      noise_multiplier=1.1, sample_rate=0.01, steps=4)
    assert ReplyPrivacy.from_content(RecordDict({"privacy": pr.to_record()})) == pr
    cfg = TrainConfig(local_epochs=2, batch_size=64, learning_rate=0.1, momentum=0.0,
                      he_weight_scale=512)
    rec = cfg.to_record()
    rec["server-round"] = 4  # Flower's strategy adds it
    got = TrainConfig.from_content(RecordDict({CONFIG: rec}), defaults=DEFAULTS)
    assert got == TrainConfig(server_round=4, local_epochs=2, batch_size=64,
                              learning_rate=0.1, momentum=0.0, he_weight_scale=512)
    assert EvalConfig.from_content(RecordDict({CONFIG: ConfigRecord({"server-round": 2})})
                                   ).server_round == 2


def test_a_request_without_config_takes_the_run_config() -> None:
    assert TrainConfig.from_content(RecordDict({}), defaults=DEFAULTS) == DEFAULTS


@pytest.mark.parametrize("key,value", [("local-epochs", 2.5), ("batch-size", "64"),
                                       ("learning-rate", float("nan")), ("server-round", True),
                                       ("he-weight-scale", 1.5)])
def test_a_hostile_request_field_is_a_clear_error(key: str, value: object) -> None:
    content = RecordDict({CONFIG: ConfigRecord({key: value})})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_content(content, defaults=DEFAULTS)


def test_a_hostile_refusal_is_rejected_by_field() -> None:
    bad = RecordDict({"refusal": ConfigRecord({"reason": "x", "site": "a",
                                               "epsilon-spent": -1.0})})
    with pytest.raises(UpdateRejected, match="epsilon-spent"):
        Refusal.from_content(bad)
    extra = RecordDict({"refusal": ConfigRecord({"reason": "x", "site": "a", "leak": 1})})
    with pytest.raises(UpdateRejected, match="unexpected"):
        Refusal.from_content(extra)


#: the literals that only protocols/messages.py (and the HE payloads' own module) spell
_LITERALS = re.compile(r'"(refusal|global-refused|declined|he-global|he-update|config|arrays'
                       r'|metrics|privacy|local-epochs|batch-size|learning-rate|momentum'
                       r'|he-weight-scale|server-round|eval-acc|eval-loss|epsilon-spent'
                       r'|epsilon-limit|sample-rate|noise-multiplier)"')
#: (file, literal) pairs that mean something else: the run summary's "privacy" block, and
#: the recorder's copy of a site's privacy record (still a dict: the typed-events slice)
_ALLOWED = {("server/recorder.py", '"privacy"'), ("server/recorder.py", '"noise-multiplier"')}


def test_no_message_literal_outside_the_protocol_module() -> None:
    offenders = []
    for pkg in ("client", "server"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if code.strip().startswith(('"""', "'")):
                    continue
                for m in _LITERALS.finditer(code):
                    offenders.append(f"{Path(path).relative_to(ROOT)}:{n}: {m.group(0)}")
    offenders = [o for o in offenders
                 if (o.split(":")[0], o.rsplit(": ", 1)[1]) not in _ALLOWED]
    assert offenders == [], "\n".join(offenders)


def _site_replies() -> dict[str, dict[str, object]]:
    """record name -> a record of every message a site sends, each field present."""
    out: dict[str, dict[str, object]] = {}
    contents = [
        Refusal(reason="r", site="a", epsilon_limit=1.0, delta=1e-5,
                epsilon_spent=0.5).to_content(),
        GlobalRefused(reason="r", site="a", version=1).to_content(),
        Declined(reason="r").to_content(),
        EvalMetrics(num_examples=1, loss=0.1, accuracy=0.5).to_content(),
        RecordDict({"metrics": TrainMetrics(num_examples=1, steps=1).to_record(),
                    "privacy": ReplyPrivacy(site="a", epsilon=1.0, delta=1e-5,
                                            accountant="prv", noise_multiplier=1.0,
                                            sample_rate=0.1, steps=1).to_record()}),
    ]
    for content in contents:
        for name, record in content.items():
            out.setdefault(name, {}).update(dict(record))
    return out


def test_what_leaves_a_site_lists_every_field_of_every_site_message() -> None:
    """docs/reference/what-leaves-a-site.md names each record a site sends and, on that
    record's rows, each of its fields: a field added to a message type without a row
    (and its bound) fails here. Every message type a site writes is sampled."""
    import dataclasses

    import protocols.messages as messages

    sent_by_sites = {TrainMetrics, ReplyPrivacy, Refusal, GlobalRefused, Declined,
                     EvalMetrics}
    requests = {TrainConfig, EvalConfig}
    types = {t for t in vars(messages).values()
             if isinstance(t, type) and dataclasses.is_dataclass(t)
             and hasattr(t, "from_content")}
    assert types == sent_by_sites | requests  # a new message type joins the sample above
    rows = [line for line in (ROOT / "docs" / "reference" / "what-leaves-a-site.md")
            .read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    missing = []
    for name, fields in _site_replies().items():
        mine = [r for r in rows if f"`{name}`" in r or f"`{name}." in r]
        if not mine:
            missing.append(f"record {name!r}")
        for key in fields:
            if not any(f"`{key}`" in r or f".{key}`" in r for r in mine):
                missing.append(f"{name}.{key}")
    assert missing == [], missing

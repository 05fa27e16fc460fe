"""Property tests: arbitrary hostile replies mixed, in any order, with honest ones.

For the plaintext and the encrypted strategy alike, whatever hypothesis makes of the
hostile replies: the round never raises, every hostile reply is rejected with a
reason (a replayed copy that happens to arrive first is accepted in place of the
original, which is then rejected: the aggregate is the same), the aggregate equals
FedAvg of the honest replies, and the recorder writes a valid summary."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from privacy.federation import load_context
from privacy.he import HEContext, HEParams
from privacy.provision import provision
from protocols.config import RunSettings
from protocols.hashchain import read_chain
from protocols.he_update import EncryptedUpdate, ciphertexts_of, he_weight, sites_of
from protocols.rundir import RunDirectory
from server.he_strategy import EncryptedFedAvg
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg

pytestmark = pytest.mark.usefixtures("flower_identity")
RUN = 4242
SHAPES = [(2, 3), (4,)]
CAP = 1000
PROPS = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


def _instr(node: int) -> Message:
    return Message(content=RecordDict({}), dst_node_id=node, message_type="train")


def _msg(node: int, records: dict[str, Any]) -> Message:
    return Message(content=RecordDict(records), reply_to=_instr(node))


def _layers(x: float) -> list[np.ndarray]:
    return [np.full(s, x, np.float32) for s in SHAPES]


def _arrays(values: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({f"l{i}": Array(v) for i, v in enumerate(values)})


def _honest(node: int, x: float, n: int) -> Message:
    return _msg(node, {"arrays": _arrays(_layers(x)),
                       "metrics": MetricRecord({"num-examples": n, "steps": 2})})


def _recorder(root: Path, **kw: Any) -> RunRecorder:
    rec = RunRecorder(RunDirectory(root), settings=RunSettings(**kw), run_id=RUN, mode="test")
    rec.start(num_sites=8, num_parameters=10)
    return rec


_bad_counts = st.one_of(
    st.integers(-(2**40), 2**40).filter(lambda v: not 1 <= v <= CAP),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 10), max_size=3))
_bad_reals = st.one_of(st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf"),
                                                                     float("-inf")]))
_junk = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=4),
                  st.binary(max_size=4), st.booleans())


@st.composite
def _plain_hostile(draw: st.DrawFn, node: int) -> Message:
    """One invalid plaintext reply: a valid base with one thing broken."""
    base = _honest(node, draw(st.floats(-3, 3)), draw(st.integers(1, CAP)))
    c = base.content
    kind = draw(st.sampled_from(["bytes", "shape", "dtype", "nonfinite", "count", "extra",
                                 "record", "missing", "loss", "privacy", "refusal", "names"]))
    rec = c.array_records["arrays"]
    if kind == "bytes":
        rec["l0"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                          data=draw(st.binary(max_size=400)))
    elif kind == "shape":
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        assume(shape != (2, 3))
        rec["l0"] = Array(np.zeros(shape, np.float32))
    elif kind == "dtype":
        dt = draw(st.sampled_from([np.float64, np.float16, np.int32, np.int8]))
        rec["l0"] = Array(np.zeros((2, 3), dt))
    elif kind == "nonfinite":
        a = np.zeros((2, 3), np.float32)
        a.flat[draw(st.integers(0, 5))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        rec["l0"] = Array(a)
    elif kind == "count":
        c.metric_records["metrics"]["num-examples"] = draw(_bad_counts)
    elif kind == "extra":
        key = draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("num-examples", "steps", "train-loss")))
        c.metric_records["metrics"][key] = draw(st.floats(allow_nan=True))
    elif kind == "record":
        name = draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("arrays", "metrics", "privacy")))
        which = draw(st.sampled_from(["metric", "config", "array"]))
        c[name] = (MetricRecord({"x": 1.0}) if which == "metric" else
                   ConfigRecord({"x": "y"}) if which == "config" else _arrays(_layers(0.0)))
    elif kind == "missing":
        del c[draw(st.sampled_from(["arrays", "metrics"]))]
    elif kind == "loss":
        c.metric_records["metrics"]["train-loss"] = draw(_bad_reals)
    elif kind == "privacy":
        good: dict[str, Any] = {"site": "s", "epsilon": 1.0, "delta": 1e-5, "accountant": "prv",
                                "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 3}
        key = draw(st.sampled_from(sorted(good)))
        not_number = st.one_of(st.text(max_size=4), st.binary(max_size=4), st.booleans())
        bad = {"site": st.one_of(st.integers(), st.floats(), st.binary(max_size=4)),
               "accountant": st.one_of(st.integers(), st.floats(), st.booleans()),
               "epsilon": st.one_of(_bad_reals, not_number),
               "noise-multiplier": st.one_of(_bad_reals, not_number),
               "delta": st.one_of(_bad_reals, st.floats(min_value=1.0001), not_number),
               "sample-rate": st.one_of(_bad_reals, st.floats(min_value=1.0001), not_number),
               "steps": st.one_of(st.integers(max_value=-1), st.floats(), not_number)}[key]
        good[key] = draw(bad)
        c["privacy"] = ConfigRecord(good)
    elif kind == "refusal":
        return _msg(node, {"refusal": ConfigRecord({
            "reason": "x", "site": "s", "epsilon-limit": 1.0, "delta": 1e-5,
            "epsilon-spent": draw(_bad_reals)})})
    else:  # layer names
        rec["other"] = rec["l1"]
        del rec["l1"]
    return base


@PROPS
@given(data=st.data())
def test_plaintext_round_with_arbitrary_hostile_replies(tmp_path_factory: pytest.TempPathFactory,
                                                         data: st.DataObject) -> None:
    k = data.draw(st.integers(2, 4), label="honest")
    # distinct in float32 too: identical updates would (rightly) be taken for a replay
    xs = [v / 8 for v in data.draw(st.lists(st.integers(-16, 16), min_size=k, max_size=k,
                                             unique=True))]
    ns = data.draw(st.lists(st.integers(1, CAP), min_size=k, max_size=k))
    honest = [_honest(i + 1, x, n) for i, (x, n) in enumerate(zip(xs, ns, strict=True))]
    h = data.draw(st.integers(0, 4), label="hostile")
    hostile = [data.draw(_plain_hostile(100 + j)) for j in range(h)]
    order = data.draw(st.permutations(honest + hostile))
    dups = data.draw(st.lists(st.sampled_from(honest), max_size=2))  # after their originals
    root = tmp_path_factory.mktemp("p")
    s = FedVaultFedAvg(recorder=_recorder(root / "run"), min_sites=2, max_examples=CAP,
                       max_weight_share=1.0)
    s.global_arrays = _arrays(_layers(0.0))

    arrays, _ = s.aggregate_train(1, [*order, *dups])

    rejected = [e for e in read_chain(s.recorder.dir.events) if e["kind"] == "update_rejected"]
    assert {e["node_id"] for e in rejected} >= {100 + j for j in range(h)}
    assert all(e["reason"] for e in rejected)
    assert len(rejected) == h + len(dups)
    assert arrays is not None
    want = sum(x * n for x, n in zip(xs, ns, strict=True)) / sum(ns)
    got = arrays.to_numpy_ndarrays()
    assert np.allclose(got[0], want, atol=1e-5) and np.allclose(got[1], want, atol=1e-5)
    s.recorder.finish()
    json.loads(s.recorder.dir.summary.read_text())


# -- encrypted -------------------------------------------------------------------------
N = 300


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "federation"
    provision(root, sites=3, params=HEParams())
    return root


@pytest.fixture(scope="module")
def site(fed: Path) -> HEContext:
    return load_context(fed, site="site-0")


#: the round's weight scale: every drawn example count (1..400) is an exact weight
SCALE = 400


def _update(site: HEContext, x: float, node: int, n: int) -> EncryptedUpdate:
    w = he_weight(n, SCALE)
    return EncryptedUpdate(scheme="bfv", fingerprint=site.fingerprint, num_values=N,
                           quant_bits=15, bound=8.0, weight=w, weight_scale=SCALE,
                           num_examples=n, run_id=RUN, round=1, node_id=node,
                           ciphertexts=tuple(site.encrypt(np.full(N, x), weight=w,
                                                          scale=SCALE)))


def _he_msg(node: int, u: EncryptedUpdate, n: int | None = None) -> Message:
    return _msg(node, {"he-update": u.to_record(),
                       "metrics": MetricRecord({"num-examples": u.num_examples if n is None
                                                else n})})


@st.composite
def _he_hostile(draw: st.DrawFn, site: HEContext, node: int,
                honest: list[EncryptedUpdate]) -> Message:
    n = draw(st.integers(1, 400))
    u = _update(site, draw(st.floats(-2, 2)), node, n)
    kind = draw(st.sampled_from(["bytes", "truncated", "slots", "version", "scheme",
                                 "fingerprint", "num-values", "weight", "examples", "node",
                                 "round", "run", "count", "record", "copy"]))
    if kind == "bytes":
        u = replace(u, ciphertexts=(draw(st.binary(max_size=2000)),))
    elif kind == "truncated":
        c = u.ciphertexts[0]  # (its length varies: compressed randomness)
        u = replace(u, ciphertexts=(c[:int(draw(st.floats(0, 0.999)) * len(c))],))
    elif kind == "slots":
        import tenseal as ts

        size = draw(st.integers(1, 4095))
        u = replace(u, ciphertexts=(ts.bfv_vector(site.ctx, [0] * size).serialize(),))
    elif kind == "version":
        u = replace(u, version=draw(st.integers().filter(lambda v: v != 3)))
    elif kind == "scheme":
        u = replace(u, scheme=draw(st.text(max_size=5).filter(lambda v: v != "bfv")))
    elif kind == "fingerprint":
        u = replace(u, fingerprint=draw(st.text(max_size=64).filter(
            lambda v: v != site.fingerprint)))
    elif kind == "num-values":
        u = replace(u, num_values=draw(st.integers(-5, 10**6).filter(lambda v: v != N)))
    elif kind == "weight":
        u = replace(u, weight=draw(st.integers(-5, 40).filter(lambda v: v != u.weight)))
    elif kind == "examples":
        return _he_msg(node, u, n=draw(st.integers(-5, 10**7).filter(lambda v: v != n)))
    elif kind == "node":
        u = replace(u, node_id=draw(st.integers(0, 10**6).filter(lambda v: v != node)))
    elif kind == "round":
        u = replace(u, round=draw(st.integers(-5, 50).filter(lambda v: v != 1)))
    elif kind == "run":
        u = replace(u, run_id=draw(st.integers(0, 10**9).filter(lambda v: v != RUN)))
    elif kind == "count":
        m = _he_msg(node, u)
        m.content.metric_records["metrics"]["num-examples"] = draw(_bad_counts)
        return m
    elif kind == "record":
        m = _he_msg(node, u)
        m.content[draw(st.sampled_from(["arrays", "extra"]))] = _arrays(_layers(0.0))
        return m
    else:  # an honest site's ciphertexts, relabelled to this node
        src = draw(st.sampled_from(honest))
        u = replace(src, node_id=node)
    return _he_msg(node, u)


@PROPS
@given(data=st.data())
def test_encrypted_round_with_arbitrary_hostile_replies(
        tmp_path_factory: pytest.TempPathFactory, fed: Path, site: HEContext,
        data: st.DataObject) -> None:
    k = data.draw(st.integers(3, 4), label="honest")
    xs = data.draw(st.lists(st.floats(-2, 2), min_size=k, max_size=k))
    ns = data.draw(st.lists(st.integers(1, 300), min_size=k, max_size=k))
    ups = [_update(site, x, i + 1, n) for i, (x, n) in enumerate(zip(xs, ns, strict=True))]
    honest = [_he_msg(i + 1, u) for i, u in enumerate(ups)]
    h = data.draw(st.integers(0, 3), label="hostile")
    hostile = [data.draw(_he_hostile(site, 100 + j, ups)) for j in range(h)]
    # honest first, then the hostile ones in any order: a copy of an honest update that
    # arrived first would be accepted in its place (the aggregate is the same; the
    # plaintext test covers arbitrary interleaving)
    order = honest + data.draw(st.permutations(hostile))
    root = tmp_path_factory.mktemp("e")
    s = EncryptedFedAvg(he=load_context(fed, site=None), num_values=N, run_id=RUN,
                        recorder=_recorder(root / "run", he=True), min_sites=3,
                        max_examples=CAP, weight_scale=SCALE)

    arrays, _ = s.aggregate_train(1, order)

    rejected = {e["node_id"]: e["reason"] for e in read_chain(s.recorder.dir.events)
                if e["kind"] == "update_rejected"}
    assert set(rejected) == {100 + j for j in range(h)} and all(rejected.values())
    assert arrays is not None and sites_of(arrays) == k
    cts, count, _ = ciphertexts_of(arrays)
    assert count == sum(u.weight for u in ups)
    mean = site.verified_mean(cts, num_values=N, count=count, sites=k, min_sites=3,
                              scale=SCALE)
    want = sum(np.clip(x, -8, 8) * u.weight for x, u in zip(xs, ups, strict=True)) / count
    bound = site.params.error_bound(sites=k, total_weight=count, scale=SCALE)
    assert np.allclose(mean, want, atol=bound + 1e-9, rtol=0)
    s.recorder.finish()
    json.loads(s.recorder.dir.summary.read_text())


"""Hostile replies against the real strategies (real Flower messages, real TenSEAL):
each attack of simulations.hostile, played the way a modified ClientApp would, is
rejected for its site or refused by the honest sites' aggregate check; the round goes
on with the honest sites and the recorder never fails on what a site sent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from client.app import build_client_app
from fedvault_tasks.tasks import flatten, get_task
from privacy.federation import load_context
from privacy.he import HEContext, HEParams
from privacy.provision import provision
from protocols.config import RunSettings
from protocols.errors import AggregateRefused
from protocols.hashchain import read_chain
from protocols.he_update import (
    EncryptedUpdate,
    ciphertexts_of,
    encrypted_arrays,
    global_record,
    he_weight,
    sites_of,
)
from protocols.node_config import NodeConfig
from protocols.rundir import RunDirectory
from server.averaging import capped_weights
from server.he_strategy import EncryptedFedAvg
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg
from simulations.hostile import Hostility, tamper_reply
from simulations.scenario import Behaviour
from tests.helpers import MessageGrid

pytestmark = pytest.mark.usefixtures("flower_identity")
RUN = 4242  # the run id the flower_identity fixture sets
SHAPES = [(2, 3), (4,)]


# -- plaintext ---------------------------------------------------------------------------
def _arrays(values: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({f"l{i}": Array(v) for i, v in enumerate(values)})


def _layers(x: float) -> list[np.ndarray]:
    return [np.full(s, x, np.float32) for s in SHAPES]


def _instruction(node: int, kind: str = "train") -> Message:
    return Message(content=RecordDict({}), dst_node_id=node, message_type=kind)


def _reply(node: int, records: dict[str, Any], kind: str = "train") -> Message:
    return Message(content=RecordDict(records), reply_to=_instruction(node, kind))


def _honest(node: int, x: float, n: int) -> Message:
    return _reply(node, {"arrays": _arrays(_layers(x)),
                         "metrics": MetricRecord({"num-examples": n, "steps": 3})})


def _recorder(root: Path, **settings: Any) -> RunRecorder:
    rec = RunRecorder(RunDirectory(root), settings=RunSettings(**settings), run_id=RUN,
                      mode="test")
    rec.start(num_sites=4, num_parameters=10)
    return rec


def _plain(tmp_path: Path, **kw: Any) -> FedVaultFedAvg:
    s = FedVaultFedAvg(recorder=_recorder(tmp_path / "run", min_sites=2), min_sites=2, **kw)
    s.global_arrays = _arrays(_layers(0.0))
    return s


def _hostility(**kw: Any) -> Hostility:
    return Hostility(settings=kw.pop("settings", RunSettings()),
                     node=kw.pop("node", NodeConfig.parse(
                         {"partition-id": 0, "num-partitions": 4}, simulated=True)),
                     state=kw.pop("state", RecordDict()), server_round=kw.pop("rnd", 1),
                     scale=kw.pop("scale", 0.0))


def _hostile(behaviour: Behaviour, node: int = 9, **kw: Any) -> Message:
    msg = _honest(node, 5.0, 50)
    assert tamper_reply(msg.content, behaviour, _hostility(**kw), phase="train")
    return msg


def _rejected(s: FedVaultFedAvg) -> dict[int, str]:
    return {e["node_id"]: e["reason"] for e in read_chain(s.recorder.dir.events)
            if e["kind"] == "update_rejected"}


def _first(arrays: ArrayRecord | None) -> float:
    assert arrays is not None
    return float(arrays.to_numpy_ndarrays()[0].ravel()[0])


@pytest.mark.parametrize(("behaviour", "reason"), [
    (Behaviour.SHAPE_LIE, "its bytes hold float32(25,), expected float32(2, 3)"),
    (Behaviour.NON_FINITE, "'train-loss' must be finite"),
    (Behaviour.EXTRA_RECORDS, "unexpected ['extra']"),
    (Behaviour.INFLATED, "'num-examples' must be in [1, 1000000]"),
    (Behaviour.OVERSIZE, "bytes, a float32(2, 3) layer takes"),
])
def test_each_malformed_plaintext_reply_is_rejected_and_the_round_goes_on(
        tmp_path: Path, behaviour: Behaviour, reason: str) -> None:
    s = _plain(tmp_path, max_weight_share=1.0)
    bad = _hostile(behaviour, scale=1.0)
    arrays, metrics = s.aggregate_train(1, [_honest(1, 1.0, 10), bad, _honest(2, 4.0, 30)])
    assert _first(arrays) == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert metrics is not None and set(metrics) == {"steps"}
    assert reason in _rejected(s)[9]
    summary = s.recorder.finish()
    assert summary["participants"][-1]["rejected"] == 1
    json.loads(s.recorder.dir.summary.read_text())  # valid JSON: no NaN, no inf


def test_a_layer_whose_bytes_disagree_with_its_declared_shape_is_rejected(
        tmp_path: Path) -> None:
    """Same byte length, another shape inside: NumPy's reading of the bytes decides."""
    s = _plain(tmp_path)
    buf = __import__("io").BytesIO()
    np.save(buf, np.zeros((3, 2), np.float32))
    lie = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buf.getvalue())
    bad = _reply(9, {"arrays": ArrayRecord({"l0": lie, "l1": Array(np.zeros(4, np.float32))}),
                     "metrics": MetricRecord({"num-examples": 10})})
    arrays, _ = s.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10), bad])
    assert _first(arrays) == pytest.approx(2.0)
    assert "its bytes hold float32(3, 2)" in _rejected(s)[9]


@pytest.mark.parametrize(("records", "reason"), [
    ({"metrics": MetricRecord({"num-examples": [1, 2]})}, "must be an integer"),
    ({"metrics": MetricRecord({"num-examples": 10}), "extra": MetricRecord({"x": 1.0})},
     "unexpected ['extra']"),
    ({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.9})}, "unexpected fields"),
    ({"metrics": MetricRecord({"num-examples": 10, "train-loss": -1.0})}, "must be in [0.0"),
    ({"metrics": MetricRecord({"num-examples": 10}),
      "privacy": ConfigRecord({"site": "x", "epsilon": "abc", "delta": 1e-5, "accountant": "prv",
                               "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 3})},
     "'epsilon' must be a number"),
])
def test_bad_metrics_and_records_are_rejected(tmp_path: Path, records: dict[str, Any],
                                             reason: str) -> None:
    s = _plain(tmp_path)
    bad = _reply(9, {"arrays": _arrays(_layers(9.0)), **records})
    arrays, _ = s.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10), bad])
    assert _first(arrays) == pytest.approx(2.0)
    assert reason in _rejected(s)[9]


def test_a_refusal_with_an_infinite_epsilon_is_rejected_not_recorded(tmp_path: Path) -> None:
    s = _plain(tmp_path)
    bad = _reply(9, {"refusal": ConfigRecord({"reason": "x", "site": "s", "epsilon-limit": 1.0,
                                              "delta": 1e-5, "epsilon-spent": float("inf")})})
    s.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10), bad])
    assert "'epsilon-spent' must be finite" in _rejected(s)[9]
    s.recorder.finish()
    json.loads(s.recorder.dir.summary.read_text())


def test_three_replies_from_one_node_count_once(tmp_path: Path) -> None:
    s = _plain(tmp_path)
    dup = _honest(1, 1.0, 10)
    arrays, _ = s.aggregate_train(1, [dup, dup, dup, _honest(2, 3.0, 10)])
    assert _first(arrays) == pytest.approx(2.0)
    rejected = [e for e in read_chain(s.recorder.dir.events) if e["kind"] == "update_rejected"]
    assert len(rejected) == 2 and all("second reply" in e["reason"] for e in rejected)


def test_a_replayed_update_is_rejected_under_any_node_id_or_round(tmp_path: Path) -> None:
    s = _plain(tmp_path)
    state = RecordDict()
    first = _honest(3, 2.0, 10)
    h1 = _hostility(state=state, rnd=1)
    tamper_reply(first.content, Behaviour.REPLAY, h1, phase="train")  # keeps a copy
    s.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10), first])
    again = _honest(3, 7.0, 10)
    tamper_reply(again.content, Behaviour.REPLAY, _hostility(state=state, rnd=2), phase="train")
    moved = _honest(8, 0.0, 10)
    moved.content["arrays"] = first.content.array_records["arrays"]  # relabelled: node 8
    arrays, _ = s.aggregate_train(2, [_honest(1, 1.5, 10), _honest(2, 2.5, 10), again, moved])
    assert _first(arrays) == pytest.approx(2.0)
    rej = _rejected(s)
    assert "replay" in rej[3] and "replay" in rej[8] and "from node 3 in round 1" in rej[8]


def test_no_site_takes_more_than_its_share_of_the_weight(tmp_path: Path) -> None:
    s = _plain(tmp_path, max_weight_share=0.5)
    replies = [_honest(1, 0.0, 100), _honest(2, 0.0 + 1e-3, 100), _honest(3, 1.0, 900_000)]
    arrays, _ = s.aggregate_train(1, replies)
    # the claimant's weight is capped at half the total: 200 of 400
    assert _first(arrays) == pytest.approx(0.5, abs=1e-3)
    assert [e for e in read_chain(s.recorder.dir.events) if e["kind"] == "weights_capped"]


def test_an_evaluation_claiming_a_billion_examples_does_not_set_the_accuracy(
        tmp_path: Path) -> None:
    s = _plain(tmp_path, max_weight_share=1.0)

    def ev(node: int, acc: float, n: int) -> Message:
        return _reply(node, {"metrics": MetricRecord({"eval-loss": 1.0, "eval-acc": acc,
                                                      "num-examples": n})}, kind="evaluate")

    liar = ev(9, 0.3, 40)
    assert tamper_reply(liar.content, Behaviour.INFLATED, _hostility(), phase="evaluate")
    m = s.aggregate_evaluate(1, [ev(1, 0.3, 40), ev(2, 0.5, 40), liar, ev(3, 1.5, 10),
                                 ev(1, 0.9, 40)])
    assert m is not None and float(m["eval-acc"]) == pytest.approx(0.4)  # type: ignore[arg-type]
    rej = [e["reason"] for e in read_chain(s.recorder.dir.events)
           if e["kind"] == "update_rejected"]
    assert len(rej) == 3 and any("[1, 1000000]" in r for r in rej)
    assert any("'eval-acc' must be in [0.0, 1.0]" in r for r in rej)


def test_capped_weights() -> None:
    assert capped_weights([1, 1, 1], 0.5) == [1, 1, 1]
    assert capped_weights([10, 1, 1], 0.5) == [2, 1, 1]
    assert capped_weights([10, 1], 0.5) == [1.0, 1.0]  # two sites: equal at most
    w = capped_weights([1e9, 5, 3, 2], 0.3)
    assert max(w) / sum(w) <= 0.3 + 1e-12 and w == [3.75, 3.75, 3, 2]  # 5 is capped too
    assert capped_weights([7, 3], 1.0) == [7, 3]


def test_a_run_without_any_aggregate_fails(tmp_path: Path) -> None:
    from protocols.hashchain import verify_chain

    s = _plain(tmp_path)
    s.aggregate_train(1, [_hostile(Behaviour.SHAPE_LIE, 1), _hostile(Behaviour.NON_FINITE, 2)])
    assert s.recorder.aggregates_formed() == 0
    summary = s.recorder.conclude()  # what run_server ends every run with
    assert summary["status"] == "failed" and "no round formed an aggregate" in summary["error"]
    assert verify_chain(s.recorder.dir.events).ok
    ok = _plain(tmp_path / "ok")
    ok.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10)])
    assert ok.recorder.conclude()["status"] == "completed"


# -- encrypted -------------------------------------------------------------------------
N = 300


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "federation"
    provision(root, sites=4, params=HEParams())
    return root


def _he_settings(fed: Path, **kw: Any) -> RunSettings:
    return RunSettings(he=True, he_federation=str(fed), min_sites=3, **kw)


def _encrypted(tmp_path: Path, fed: Path, **kw: Any) -> EncryptedFedAvg:
    kw.setdefault("weight_scale", SCALE)
    return EncryptedFedAvg(he=load_context(fed, site=None), num_values=N, run_id=RUN,
                           recorder=_recorder(tmp_path / "run", he=True), min_sites=3, **kw)


#: the weight scale of the test rounds: 16 examples (every honest reply's) weigh 16
SCALE = 16


def _he_reply(site: HEContext, x: np.ndarray, node: int, n: int = 16, rnd: int = 1
              ) -> Message:
    w = he_weight(n, SCALE)
    u = EncryptedUpdate(scheme="bfv", fingerprint=site.fingerprint, num_values=len(x),
                        quant_bits=15, bound=8.0, weight=w, weight_scale=SCALE, num_examples=n,
                        run_id=RUN, round=rnd, node_id=node,
                        ciphertexts=tuple(site.encrypt(x, weight=w, scale=SCALE)))
    return _reply(node, {"he-update": u.to_record(),
                         "metrics": MetricRecord({"num-examples": n, "steps": 1})})


def _he_hostile(fed: Path, behaviour: Behaviour, site: HEContext, node: int = 9,
                **kw: Any) -> Message:
    msg = _he_reply(site, np.full(N, 0.3), node)
    h = _hostility(settings=_he_settings(fed),
                   node=NodeConfig.parse({"site-name": "site-3", "partition-id": 3,
                                             "num-partitions": 4}, simulated=True), **kw)
    assert tamper_reply(msg.content, behaviour, h, phase="train")
    return msg


@pytest.mark.parametrize(("behaviour", "reason"), [
    (Behaviour.SHAPE_LIE, "ciphertext: vector of 10 slots, expected 4096"),
    (Behaviour.NON_FINITE, "'train-loss' must be finite"),
    (Behaviour.EXTRA_RECORDS, "unexpected ['extra']"),
    (Behaviour.INFLATED, "must be in [1, 1000000]"),
    (Behaviour.OVERSIZE, "ciphertext: ciphertext of 1048576 bytes"),
])
def test_each_malformed_encrypted_reply_is_rejected(tmp_path: Path, fed: Path,
                                                    behaviour: Behaviour, reason: str) -> None:
    s = _encrypted(tmp_path, fed)
    site = load_context(fed, site="site-0")
    bad = _he_hostile(fed, behaviour, site, scale=1.0)
    honest = [_he_reply(site, np.full(N, v), k) for k, v in ((1, 0.25), (2, 0.5), (3, 0.75))]
    arrays, _ = s.aggregate_train(1, [honest[0], bad, *honest[1:]])
    assert arrays is not None and sites_of(arrays) == 3
    cts, count, _ = ciphertexts_of(arrays)
    mean = site.verified_mean(cts, num_values=N, count=count, sites=3, min_sites=3,
                              scale=SCALE)
    assert np.allclose(mean, 0.5, atol=1e-3)
    assert reason in _rejected(s)[9]


@pytest.mark.parametrize(("change", "reason"), [
    ({"num_examples": -200}, "num-examples must be >= 1"),
    ({"weight": 15}, "does not follow from 16 examples"),
    ({"weight_scale": 32}, "this round's is 16"),
    ({"node_id": 8}, "sent by node 9"),
])
def test_encrypted_header_lies_are_rejected(tmp_path: Path, fed: Path, change: dict[str, Any],
                                            reason: str) -> None:
    s = _encrypted(tmp_path, fed)
    site = load_context(fed, site="site-0")
    good = _he_reply(site, np.zeros(N), 9)
    u = EncryptedUpdate.from_record(good.content.config_records["he-update"])
    bad = _reply(9, {"he-update": replace(u, **change).to_record(),
                     "metrics": MetricRecord({"num-examples": 16})})
    honest = [_he_reply(site, np.full(N, 0.1 * k), k) for k in (1, 2, 3)]
    arrays, _ = s.aggregate_train(1, [*honest, bad])
    assert arrays is not None and sites_of(arrays) == 3
    assert reason in _rejected(s)[9]


def test_a_missing_example_count_is_rejected(tmp_path: Path, fed: Path) -> None:
    s = _encrypted(tmp_path, fed)
    site = load_context(fed, site="site-0")
    bad = _he_reply(site, np.zeros(N), 9)
    bad.content["metrics"] = MetricRecord({"steps": 1})
    arrays, _ = s.aggregate_train(1, [*[_he_reply(site, np.full(N, 0.1 * k), k)
                                        for k in (1, 2, 3)], bad])
    assert arrays is not None and "lacks 'num-examples'" in _rejected(s)[9]


def test_a_ckks_vector_at_another_scale_is_rejected(tmp_path: Path) -> None:
    import tenseal as ts

    from privacy.he import ckks_params, new_secret_context

    params = ckks_params()
    ctx = new_secret_context(params)
    site = HEContext(ctx, params)
    public = HEContext.load(site.ctx.serialize(save_secret_key=False), params)
    s = EncryptedFedAvg(he=public, num_values=N, run_id=RUN,
                        recorder=_recorder(tmp_path / "run", he=True), min_sites=2,
                        weight_scale=1)

    def reply(node: int, cts: list[bytes]) -> Message:
        u = EncryptedUpdate(scheme="ckks", fingerprint=site.fingerprint, num_values=N,
                            quant_bits=16, bound=8.0, weight=1, weight_scale=1,
                            num_examples=16, run_id=RUN,
                            round=1, node_id=node, ciphertexts=tuple(cts))
        return _reply(node, {"he-update": u.to_record(),
                             "metrics": MetricRecord({"num-examples": 16})})

    odd = ts.ckks_vector(ctx, [0.0] * (N + 2), scale=2.0**30).serialize()
    arrays, _ = s.aggregate_train(1, [reply(1, site.encrypt(np.full(N, 0.5))), reply(9, [odd]),
                                      reply(2, site.encrypt(np.full(N, 1.5)))])
    assert arrays is not None and sites_of(arrays) == 2
    assert "CKKS scale 2^30.0, expected 2^40.0" in _rejected(s)[9]
    cts, count, _ = ciphertexts_of(arrays)
    mean = site.verified_mean(cts, num_values=N, count=count, sites=2, min_sites=2)
    assert np.allclose(mean, 1.0, atol=1e-4)


def test_a_replayed_ciphertext_relabelled_to_another_node_and_round_is_rejected(
        tmp_path: Path, fed: Path) -> None:
    s = _encrypted(tmp_path, fed)
    site = load_context(fed, site="site-0")
    state = RecordDict()
    settings = _he_settings(fed)
    node = NodeConfig.parse({"site-name": "site-3", "partition-id": 3,
                                             "num-partitions": 4}, simulated=True)
    first = _he_reply(site, np.full(N, 0.2), 4)
    tamper_reply(first.content, Behaviour.REPLAY,
                 _hostility(settings=settings, node=node, state=state, rnd=1), phase="train")
    s.aggregate_train(1, [first, *[_he_reply(site, np.full(N, 0.1 * k), k) for k in (1, 2, 3)]])
    again = _he_reply(site, np.full(N, 0.9), 4, rnd=2)
    tamper_reply(again.content, Behaviour.REPLAY,
                 _hostility(settings=settings, node=node, state=state, rnd=2), phase="train")
    # the same bytes under node 5, its header rebound to node 5 and round 2
    u = EncryptedUpdate.from_record(first.content.config_records["he-update"])
    moved = _reply(5, {"he-update": replace(u, node_id=5, round=2).to_record(),
                       "metrics": MetricRecord({"num-examples": 16})})
    arrays, _ = s.aggregate_train(2, [again, moved, *[_he_reply(site, np.full(N, 0.2 * k), k,
                                                                rnd=2) for k in (1, 2, 3)]])
    assert arrays is not None and sites_of(arrays) == 3
    rej = _rejected(s)
    assert "replay" in rej[4] and "replay" in rej[5]


@pytest.mark.parametrize(("behaviour", "reason"), [
    (Behaviour.RAW_SLOTS, "site contributions"),
    (Behaviour.WEIGHT_LIE, "site contributions"),
    (Behaviour.FOREIGN_KEY, "site contributions"),
])
def test_forged_ciphertexts_pass_the_server_and_the_sites_refuse_the_aggregate(
        tmp_path: Path, fed: Path, behaviour: Behaviour, reason: str) -> None:
    s = _encrypted(tmp_path, fed)
    site = load_context(fed, site="site-0")
    bad = _he_hostile(fed, behaviour, site)
    arrays, _ = s.aggregate_train(1, [*[_he_reply(site, np.full(N, 0.1 * k), k)
                                        for k in (1, 2, 3)], bad])
    assert arrays is not None and sites_of(arrays) == 4  # the server cannot tell
    cts, count, _ = ciphertexts_of(arrays)
    with pytest.raises(AggregateRefused, match=reason):
        site.verified_mean(cts, num_values=N, count=count, sites=4, min_sites=3)


def test_a_single_update_handed_out_as_the_global_model_is_refused(fed: Path) -> None:
    site = load_context(fed, site="site-0")
    one = list(site.encrypt(np.full(N, 0.3)))
    with pytest.raises(AggregateRefused, match="holds 1 site contributions, the server claims 3"):
        site.verified_mean(one, num_values=N, count=3, sites=3, min_sites=3)
    with pytest.raises(AggregateRefused, match="fewer than min-sites 3"):
        site.verified_mean(one, num_values=N, count=1, sites=1, min_sites=3)
    assert np.allclose(site.verified_mean(one, num_values=N, count=1, sites=1, min_sites=1),
                       0.3, atol=1e-3)


# -- the ClientApp's check, incident and refusal; the server's roll-back ------------------
def _digits_global(fed: Path, values: np.ndarray, *, sites: int, count: int) -> Message:
    he = load_context(fed, site="site-0")
    cts = he.encrypt(values)
    rec = global_record(scheme="bfv", fingerprint=he.fingerprint, num_values=len(values),
                        count=count, sites=sites, weight_scale=1, server_round=2,
                        ciphertexts=cts)
    return Message(content=RecordDict({"he-global": rec, "config": ConfigRecord(
        {"server-round": 3, "local-epochs": 1, "batch-size": 64, "learning-rate": 0.1,
         "momentum": 0.9})}), dst_node_id=11, message_type="train")


def test_an_honest_site_refuses_a_corrupt_global_model_records_it_and_spends_nothing(
        tmp_path: Path, fed: Path) -> None:
    torch.manual_seed(0)
    flat = flatten(get_task("digits").build_model().state_dict())
    settings = RunSettings(run_dir=str(tmp_path / "run"), he=True, he_federation=str(fed),
                           min_sites=3)
    ctx = Context(run_id=RUN, node_id=11, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config=dict(settings.to_config()))
    app = build_client_app(simulated=True)
    reply = app(_digits_global(fed, flat, sites=3, count=3), ctx)  # one update, claimed as 3
    assert "global-refused" in reply.content.config_records, reply.content
    refused = dict(reply.content.config_records["global-refused"])
    assert refused["version"] == 2 and "holds 1 site contributions" in str(refused["reason"])
    assert not reply.content.array_records and "he-update" not in reply.content.config_records
    found = list(tmp_path.rglob("*.incidents.jsonl"))
    assert len(found) == 1, found
    incidents = read_chain(found[0])
    assert incidents[-1]["kind"] == "global_model_refused" and incidents[-1]["version"] == 2
    ledger = Path(str(found[0]).replace(".incidents.jsonl", ".jsonl"))
    assert not ledger.exists() or not [e for e in read_chain(ledger)
                                       if e["kind"] == "reservation"]


def test_a_refused_global_model_is_rolled_back(tmp_path: Path) -> None:
    s = _plain(tmp_path)
    grid: Any = MessageGrid([1, 2, 3])
    v0 = _arrays(_layers(0.0))
    s.configure_train(1, v0, ConfigRecord(), grid)
    v1, _ = s.aggregate_train(1, [_honest(1, 1.0, 10), _honest(2, 3.0, 10)])
    assert v1 is not None
    s.configure_train(2, v1, ConfigRecord(), grid)

    def refusal(node: int, version: int = 1) -> Message:
        return _reply(node, {"global-refused": ConfigRecord({"reason": "bad", "site": "s",
                                                             "version": version})})

    # one hostile site's refusal alone does not roll back; a wrong version is rejected
    v2, _ = s.aggregate_train(2, [_honest(1, 5.0, 10), _honest(2, 6.0, 10), refusal(3),
                                  refusal(4, version=0)])
    assert v2 is not None and v2 is not v1
    assert "refuses global model version 0; this phase sent version 1" in _rejected(s)[4]
    s.configure_train(3, v2, ConfigRecord(), grid)
    # most of the sites refuse version 2: the server goes back to version 1
    back, metrics = s.aggregate_train(3, [_honest(1, 7.0, 10), refusal(2, 2), refusal(3, 2)])
    assert back is v1 and metrics is None
    kinds = [e["kind"] for e in read_chain(s.recorder.dir.events)]
    assert kinds.count("global_refused") == 3 and "global_refusal_outvoted" in kinds
    assert "rolled_back" in kinds
    summary = s.recorder.finish()
    assert summary["rollbacks"] == [{"round": 3, "refused_version": 2, "to_version": 1}]


def test_encrypted_arrays_record_sites(fed: Path) -> None:
    site = load_context(fed, site="site-0")
    arrays = encrypted_arrays(site.encrypt(np.zeros(N)), count=1, server_round=1, sites=1)
    assert sites_of(arrays) == 1


def test_a_site_refuses_a_global_model_that_moved_too_far(fed: Path) -> None:
    from client.he_client import LAST_ACCEPTED, load_encrypted_global, remember_global

    site = load_context(fed, site="site-0")
    torch.manual_seed(0)
    model = get_task("digits").build_model()
    flat = flatten(model.state_dict())

    def global_of(values: np.ndarray) -> ConfigRecord:
        return global_record(scheme="bfv", fingerprint=site.fingerprint, num_values=len(values),
                             count=3, sites=3, weight_scale=1, server_round=4, ciphertexts=[
                                 c for c in site.add([site.encrypt(values) for _ in range(3)])])

    state = RecordDict()
    remember_global(state, flat)
    # a small step is accepted and becomes the new reference
    assert load_encrypted_global(model, global_of(flat + 0.01), site, min_sites=3,
                                 max_change=4.0, state=state) == 4
    assert np.allclose(state.array_records[LAST_ACCEPTED]["flat"].numpy(), flat + 0.01,
                       atol=1e-3)
    # a jump of many times the model's norm (inside the honest value range) is not
    far = np.clip(flat + 7.0 * np.sign(flat + 1e-9), -8, 8)
    with pytest.raises(AggregateRefused, match=r"moved by .* \(he-max-change 4.0\)"):
        load_encrypted_global(model, global_of(far), site, min_sites=3, max_change=4.0,
                              state=state)
    # 0 turns the check off
    load_encrypted_global(model, global_of(far), site, min_sites=3, max_change=0.0, state=state)


def test_model_decrypt_refuses_a_forged_aggregate(tmp_path: Path, fed: Path) -> None:
    from client.release import decrypt_model

    torch.manual_seed(0)
    x = flatten(get_task("digits").build_model().state_dict())
    n = len(x)
    run = RunDirectory(tmp_path / "run")
    rec = RunRecorder(run, settings=RunSettings(he=True, min_sites=3), run_id=RUN, mode="test")
    rec.start(num_sites=4, num_parameters=n)
    s = EncryptedFedAvg(he=load_context(fed, site=None), num_values=n, run_id=RUN, recorder=rec,
                        min_sites=3, weight_scale=1)
    site = load_context(fed, site="site-0")

    def reply(node: int, values: np.ndarray) -> Message:
        u = EncryptedUpdate(scheme="bfv", fingerprint=site.fingerprint, num_values=n,
                            quant_bits=15, bound=8.0, weight=1, weight_scale=1,
                            num_examples=16, run_id=RUN,
                            round=1, node_id=node, ciphertexts=tuple(site.encrypt(values)))
        return _reply(node, {"he-update": u.to_record(),
                             "metrics": MetricRecord({"num-examples": 16})})

    liar = reply(4, x)
    h = _hostility(settings=_he_settings(fed), node=NodeConfig.parse(
        {"site-name": "site-3", "partition-id": 3, "num-partitions": 4}, simulated=True))
    tamper_reply(liar.content, Behaviour.WEIGHT_LIE, h, phase="train")
    arrays, _ = s.aggregate_train(1, [reply(1, x), reply(2, x + 0.01), reply(3, x - 0.01), liar])
    assert arrays is not None
    rec.end_round(1, arrays, None)
    with pytest.raises(AggregateRefused, match="holds 19 site contributions, the server claims 4"):
        decrypt_model(run.root, federation=fed, site="site-1", server_round=1)
    assert not (run.root / "releases.jsonl").exists()

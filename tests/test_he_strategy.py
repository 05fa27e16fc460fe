"""Encrypted FedAvg at the server, with real TenSEAL ciphertexts and real Flower messages."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from privacy.federation import load_context
from privacy.he import HEContext, HEParams
from privacy.provision import provision
from protocols.config import RunSettings
from protocols.errors import HEError
from protocols.hashchain import read_chain
from protocols.he_update import EncryptedUpdate, ciphertexts_of, is_encrypted, scale_of
from protocols.rundir import RunDirectory
from server.he_strategy import EncryptedFedAvg
from server.recorder import RunRecorder

pytestmark = pytest.mark.usefixtures("flower_identity")
N = 5000
RUN = 4242  # the run id the flower_identity fixture sets


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "federation"
    provision(root, sites=4, params=HEParams())
    return root


def _strategy(tmp_path: Path, fed: Path, min_sites: int = 2, weight_scale: int = 1
              ) -> EncryptedFedAvg:
    """A strategy at a fixed weight scale (1: every site weighs 1, an unweighted mean)."""
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(he=True), run_id=RUN,
                      mode="test")
    return EncryptedFedAvg(he=load_context(fed, site=None), num_values=N, run_id=RUN,
                           recorder=rec, min_sites=min_sites, weight_scale=weight_scale)


def _update(site: HEContext, x: np.ndarray, node: int, rnd: int = 1) -> EncryptedUpdate:
    return EncryptedUpdate(scheme="bfv", fingerprint=site.fingerprint, num_values=len(x),
                           quant_bits=15, bound=8.0, weight=1, weight_scale=1, num_examples=10,
                           run_id=RUN, round=rnd, node_id=node,
                           ciphertexts=tuple(site.encrypt(x)))


def _reply(node: int, u: EncryptedUpdate | None, **records: object) -> Message:
    instr = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    n = u.num_examples if u is not None else 10
    content: dict[str, object] = {"metrics": MetricRecord({"num-examples": n})}
    if u is not None:
        content["he-update"] = u.to_record()
    content.update(records)
    return Message(content=RecordDict(content), reply_to=instr)  # type: ignore[arg-type]


def test_server_refuses_a_secret_context(tmp_path: Path, fed: Path) -> None:
    with pytest.raises(HEError, match="must not hold the secret key"):
        EncryptedFedAvg(he=load_context(fed, site="site-0"), num_values=N, run_id=RUN,
                        recorder=_strategy(tmp_path, fed).recorder, min_sites=1)


def test_aggregate_decrypts_to_the_plaintext_mean(tmp_path: Path, fed: Path) -> None:
    s = _strategy(tmp_path, fed)
    site = load_context(fed, site="site-0")
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 0.5, N) for _ in range(3)]
    arrays, _ = s.aggregate_train(1, [_reply(i + 1, _update(site, x, i + 1))
                                      for i, x in enumerate(xs)])
    assert arrays is not None and is_encrypted(arrays)
    cts, count, rnd = ciphertexts_of(arrays)
    assert count == 3 and rnd == 1
    mean = site.decrypt_mean(cts, num_values=N, count=count)
    assert np.abs(mean - np.mean(xs, axis=0)).max() <= site.params.step
    with pytest.raises(HEError):  # and the server's own context cannot read it
        s.he.decrypt_mean(cts, num_values=N, count=count)


def _bad_cases(site: HEContext, other: HEContext) -> list[tuple[str, Message]]:
    x = np.zeros(N)
    good = _update(site, x, 9)
    return [
        ("does not match the federation", _reply(9, _update(other, x, 9))),
        ("values, the model has", _reply(9, replace(good, num_values=N - 1))),
        ("ciphertexts, expected", _reply(9, replace(good, ciphertexts=good.ciphertexts * 2))),
        ("(replay)", _reply(9, _update(site, x, 9, rnd=0))),
        ("(replay)", _reply(9, replace(good, run_id=RUN + 1))),
        ("sent by node", _reply(9, replace(good, node_id=8))),
        ("does not parse", _reply(9, replace(good, ciphertexts=(
            b"\x00" * 100,) * len(good.ciphertexts)))),
        ("wire version", _reply(9, replace(good, version=1))),
        ("outside [1, 1]", _reply(9, replace(good, weight=17))),
        ("this round's is 1", _reply(9, replace(good, weight_scale=64))),
        ("unexpected ['arrays']", _reply(9, good, arrays=ArrayRecord(numpy_ndarrays=[x]))),
        ("missing ['he-update']", _reply(9, None)),
    ]


def test_each_malformed_or_replayed_update_is_rejected_and_the_round_completes(
        tmp_path: Path, fed: Path) -> None:
    site = load_context(fed, site="site-0")
    other_root = tmp_path / "other"
    provision(other_root, sites=1, params=HEParams())
    other = load_context(other_root, site="site-0")
    for i, (reason, bad) in enumerate(_bad_cases(site, other)):
        s = _strategy(tmp_path / f"case-{i}", fed)
        xs = [np.full(N, 0.25), np.full(N, 0.75)]
        arrays, _ = s.aggregate_train(1, [_reply(1, _update(site, xs[0], 1)),
                                          _reply(2, _update(site, xs[1], 2)), bad])
        assert arrays is not None, reason
        cts, count, _ = ciphertexts_of(arrays)
        assert count == 2, reason
        assert np.allclose(site.decrypt_mean(cts, num_values=N, count=2), 0.5, atol=1e-3)
        rejected = [e for e in read_chain(s.recorder.dir.events) if e["kind"] == "update_rejected"]
        assert len(rejected) == 1 and reason in rejected[0]["reason"], (reason, rejected)


def test_weights_are_summed_in_the_clear(tmp_path: Path, fed: Path) -> None:
    s = _strategy(tmp_path, fed, weight_scale=16)
    site = load_context(fed, site="site-0")
    u1, u2 = (replace(_update(site, np.full(N, x), k), weight=w, num_examples=w,
                      weight_scale=16,
                      ciphertexts=tuple(site.encrypt(np.full(N, x), weight=w, scale=16)))
              for k, x, w in ((1, 1.0, 4), (2, 0.0, 1)))
    arrays, _ = s.aggregate_train(1, [_reply(1, u1), _reply(2, u2)])
    assert arrays is not None
    cts, total, _ = ciphertexts_of(arrays)
    assert total == 5 and scale_of(arrays) == 16
    bound = site.params.error_bound(sites=2, total_weight=5, scale=16)
    assert np.allclose(site.decrypt_mean(cts, num_values=N, count=total, scale=16), 0.8,
                       atol=bound)


def test_duplicate_from_one_node_is_rejected(tmp_path: Path, fed: Path) -> None:
    s = _strategy(tmp_path, fed)
    site = load_context(fed, site="site-0")
    u = _update(site, np.zeros(N), 1)
    arrays, _ = s.aggregate_train(1, [_reply(1, u), _reply(1, u), _reply(2, _update(
        site, np.zeros(N), 2))])
    assert arrays is not None and ciphertexts_of(arrays)[1] == 2
    ev = [e for e in read_chain(s.recorder.dir.events) if e["kind"] == "update_rejected"]
    assert "a second reply from this node" in ev[0]["reason"]


def test_fewer_than_min_sites_form_no_aggregate(tmp_path: Path, fed: Path) -> None:
    s = _strategy(tmp_path, fed, min_sites=3)
    site = load_context(fed, site="site-0")
    arrays, metrics = s.aggregate_train(1, [_reply(1, _update(site, np.zeros(N), 1)),
                                            _reply(2, _update(site, np.zeros(N), 2))])
    assert arrays is None and metrics is None
    assert "aggregate_refused" in [e["kind"] for e in read_chain(s.recorder.dir.events)]


def test_release_record_counts_sites_not_weights(tmp_path: Path, fed: Path) -> None:
    """`fedvault model decrypt` once recorded the sum of the encryption weights as the
    number of sites in the aggregate (73 for the 10-site demo)."""
    import torch

    from client.release import RELEASES, decrypt_model
    from fedvault_tasks.tasks import flatten, get_task

    model = get_task("digits").build_model()
    x = flatten(model.state_dict())
    n = len(x)
    run = RunDirectory(tmp_path / "run")
    rec = RunRecorder(run, settings=RunSettings(he=True, min_sites=2), run_id=RUN, mode="test")
    rec.start(num_sites=2, num_parameters=n)
    s = EncryptedFedAvg(he=load_context(fed, site=None), num_values=n, run_id=RUN,
                        recorder=rec, min_sites=2, weight_scale=16)
    site = load_context(fed, site="site-0")
    ups = [replace(_update(site, x, k), num_values=n, weight=w, num_examples=w, weight_scale=16,
                   ciphertexts=tuple(site.encrypt(x, weight=w, scale=16)))
           for k, w in ((1, 12), (2, 4))]
    arrays, _ = s.aggregate_train(1, [_reply(1, ups[0]), _reply(2, ups[1])])
    assert arrays is not None
    rec.end_round(1, arrays, None)
    entry = decrypt_model(run.root, federation=fed, site="site-1", server_round=1)
    released = read_chain(run.root / RELEASES)
    assert released[-1]["sites_in_aggregate"] == entry["sites_in_aggregate"] == 2
    assert released[-1]["total_weight"] == 16
    out = torch.load(entry["output"], weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(out[k], v, atol=1e-3)


def test_a_sum_that_fails_midway_is_undone(tmp_path: Path, fed: Path) -> None:
    """The running sum is added to in place; if TenSEAL refuses the second ciphertext of
    an update, the first one is subtracted again: the sum stands as it was."""
    from protocols.messages import TrainMetrics
    from server.he_strategy import EncryptedParsed

    s = _strategy(tmp_path, fed)
    site = load_context(fed, site="site-0")
    other_root = tmp_path / "other"
    provision(other_root, sites=1, params=HEParams(poly_modulus_degree=8192))
    other = load_context(other_root, site="site-0")
    x = np.linspace(-1, 1, 2 * site.params.values_per_ciphertext)
    s._sum = [s.he.parse(c) for c in site.encrypt(x)]
    good = s.he.parse(site.encrypt(np.ones_like(x))[0])
    foreign = other.parse(other.encrypt(np.ones(10))[0])  # another ring: add_ raises
    p = EncryptedParsed(node_id=7,
                        metrics=TrainMetrics(num_examples=1, steps=1, train_loss=None),
                        privacy=None, weight=1, bytes_up=0, digest="d", vectors=[good, foreign])
    with pytest.raises(Exception, match="homomorphic sum refused"):
        s.include(1, p)
    back = site.decrypt_mean([v.serialize() for v in s._sum], num_values=x.size, count=1)
    assert np.allclose(back, x, atol=site.params.step)

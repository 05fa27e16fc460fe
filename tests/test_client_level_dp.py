"""Client-level DP (DP-FedAvg) wrapper, with real Flower messages and a real server ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from privacy.accountants import PRVAccountant
from privacy.events import SubsampledGaussianEvent
from privacy.ledger import PrivacyLedger
from protocols.config import RunSettings
from protocols.hashchain import read_chain
from protocols.rundir import RunDirectory
from server.client_level_dp import ClientLevelDP, federation_fingerprint
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg

pytestmark = pytest.mark.usefixtures("flower_identity")
D = 50_000


def _arrays(v: np.ndarray) -> ArrayRecord:
    return ArrayRecord(numpy_ndarrays=[v.astype(np.float32)])


def _reply(node: int, v: np.ndarray, n: int) -> Message:
    instr = Message(content=RecordDict({"arrays": _arrays(np.zeros(D))}), dst_node_id=node,
                    message_type="train")
    return Message(content=RecordDict({"arrays": _arrays(v), "metrics": MetricRecord(
        {"num-examples": n})}), reply_to=instr)


def _wrapper(tmp_path: Path, sigma: float, max_eps: float = 100.0) -> ClientLevelDP:
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(), run_id=1,
                      mode="test")
    inner = FedVaultFedAvg(recorder=rec, min_sites=2)
    w = ClientLevelDP(inner, noise_multiplier=sigma, clipping_norm=1.0,
                      ledger=PrivacyLedger(tmp_path / "server-ledger.jsonl"), federation="f",
                      run_id="1", delta=1e-5, max_epsilon=max_eps)
    w.current = _arrays(np.zeros(D))
    inner.global_arrays = w.current
    return w


def test_clips_averages_uniformly_and_adds_calibrated_noise(tmp_path: Path) -> None:
    w = _wrapper(tmp_path, sigma=0.5)
    big = np.full(D, 1.0)  # norm sqrt(D) >> 1: clipped to norm 1
    small = np.zeros(D)
    small[0] = 0.5  # norm 0.5: unchanged
    arrays, _ = w.aggregate_train(1, [_reply(1, big, 1000), _reply(2, small, 1)])
    assert arrays is not None
    out = arrays.to_numpy_ndarrays()[0].astype(np.float64)
    expected = (big / np.sqrt(D) + small) / 2  # uniform, not weighted by 1000:1
    noise = out - expected
    std = 0.5 * 1.0 / 2
    assert abs(noise.std() - std) / std < 0.02 and abs(noise.mean()) < 0.01
    led = read_chain(tmp_path / "server-ledger.jsonl")
    res = [e for e in led if e["kind"] == "reservation"]
    assert res[0]["events"] == [SubsampledGaussianEvent(
        noise_multiplier=0.5, sample_rate=1.0, steps=1).to_dict()]
    assert res[0]["scope"] == federation_fingerprint("f")


def test_noise_follows_the_number_actually_averaged(tmp_path: Path) -> None:
    w = _wrapper(tmp_path, sigma=1.0)
    nan = np.full(D, np.nan)
    # (distinct updates: an identical one would be rejected as a replay)
    replies = [_reply(1, np.full(D, 1e-6), 5), _reply(2, np.full(D, 2e-6), 5), _reply(3, nan, 5)]
    arrays, _ = w.aggregate_train(1, replies)  # the NaN reply is rejected: m = 2, not 3
    assert arrays is not None
    assert abs(arrays.to_numpy_ndarrays()[0].std() - 0.5) / 0.5 < 0.02


def test_no_release_past_the_central_budget(tmp_path: Path) -> None:
    sigma = 2.0
    one = PRVAccountant().epsilon([SubsampledGaussianEvent(
        noise_multiplier=sigma, sample_rate=1.0, steps=1)], delta=1e-5)
    w = _wrapper(tmp_path, sigma=sigma, max_eps=one * 1.2)
    ok, _ = w.aggregate_train(1, [_reply(1, np.full(D, 1e-6), 1), _reply(2, np.full(D, 2e-6), 1)])
    refused, _ = w.aggregate_train(2, [_reply(1, np.full(D, 3e-6), 1),
                                       _reply(2, np.full(D, 4e-6), 1)])
    assert ok is not None and refused is None
    kinds = [e["kind"] for e in read_chain(tmp_path / "run" / "events.jsonl")]
    assert "release_refused" in kinds
    assert PrivacyLedger(tmp_path / "server-ledger.jsonl").spent(
        federation_fingerprint("f"), delta=1e-5) <= one * 1.2

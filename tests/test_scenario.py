"""Scenario files, partitions, the simulated clock and site behaviour (no Ray here)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import build_client_app
from fedvault_tasks.partition import label_skew, site_partition
from fedvault_tasks.tasks import Table, get_task
from protocols.config import RunSettings
from protocols.errors import ConfigError
from simulations.behaviour import (
    DROPPED_BEFORE,
    DROPPED_MID_UPLOAD,
    OFFLINE,
    ONLINE,
    ScenarioBehaviour,
    backdoor_table,
    fate,
    simulation_mod,
    tamper_state,
)
from simulations.clock import Exchange, Link, phase_seconds, site_seconds
from simulations.scenario import (
    builtin_path,
    builtin_scenarios,
    load_compiled,
    load_scenario,
    parse_scenario,
    save_compiled,
)

BASE: dict[str, Any] = {"name": "t", "data": {"task": "digits"},
                        "run": {"num-server-rounds": 2, "dp": False},
                        "sites": [{"count": 4}]}


def _doc(**patch: Any) -> dict[str, Any]:
    doc = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, v in BASE.items()}
    for key, value in patch.items():
        doc[key] = value
    return doc


# -- validation -------------------------------------------------------------------------
@pytest.mark.parametrize("patch, message", [
    ({"sites": []}, "at least one [[sites]]"),
    ({"sites": [{"count": 0}]}, "[[sites]] #1 'count' must be >= 1"),
    ({"sites": [{"count": 2}, {"uplink-mbps": 0}]}, "[[sites]] #2 'uplink-mbps' must be > 0"),
    ({"sites": [{"dropout": 1.5}]}, "'dropout' must be a probability"),
    ({"sites": [{"dropout-mode": "sometimes"}]}, "'dropout-mode' must be one of"),
    ({"sites": [{"behaviour": "evil"}]}, "'behaviour' must be one of"),
    ({"sites": [{"labels": [0, 12]}]}, "'labels' must be labels in [0, 9]"),
    ({"sites": [{"bandwidth": 3}]}, "[[sites]] #1: unknown key 'bandwidth'"),
    ({"sites": [{"compute": "fast"}]}, "'compute' must be a number"),
    ({"defaults": {"latency-ms": -1}, "sites": [{}]}, "'latency-ms' must be >= 0"),
    ({"data": {"task": "digits", "partition": "zipf"}}, "[data] 'partition' must be one of"),
    ({"data": {"task": "speech"}}, "[data] 'task': Unknown task 'speech'"),
    ({"run": {"num-classes": "ten"}}, "'num-classes' must be an integer"),
    ({"data": {"task": "tabular", "generate": {"rows": 1000, "features": 2, "classes": 10}}},
     "10 classes need more features than 2"),
    ({"data": {"task": "tabular", "generate": {"rows": 1000, "features": 8, "classes": 4}},
      "run": {"num-classes": 3}}, "'num-classes' = 3 contradicts [data] generate"),
    ({"run": {"site-min-noise-multiplier": 1.0}}, "set by [defaults] min-noise-multiplier"),
    ({"run": {"client-dp": True, "he": True}}, "cannot be combined with he = true"),
    ({"data": {"task": "digits", "generate": {"rows": 100, "features": 4, "classes": 2}}},
     "'generate' makes a table for task 'tabular'"),
    ({"run": {"rounds": 3}}, "[run] Unknown run-config key 'rounds'"),
    ({"run": {"num-server-rounds": 0}}, "num-server-rounds must be >= 1"),
    ({"run": {"alpha": 0.1}}, "'alpha' is set by [data] alpha"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_validation_errors_name_the_bad_key(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(_doc(**patch), source="s.toml")
    assert message in str(err.value)
    assert "s.toml" in str(err.value)


def test_sites_per_round_becomes_flowers_sample_size() -> None:
    for n_sites, per_round in ((1000, 100), (7, 3), (999, 333), (10, 10)):
        sc = parse_scenario(_doc(run={"sites-per-round": per_round},
                                 sites=[{"count": n_sites}]))
        fraction = sc.settings(run_dir="/x").fraction_train
        assert int(n_sites * fraction) == per_round  # what Flower's FedAvg samples
    with pytest.raises(ConfigError, match=r"'sites-per-round' must be in \[3, 4\]"):
        parse_scenario(_doc(run={"sites-per-round": 5}))
    with pytest.raises(ConfigError, match="not both"):
        parse_scenario(_doc(run={"sites-per-round": 2, "fraction-train": 0.5}))


def test_bad_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="built-in scenarios: cross-device-1000"):
        load_scenario(tmp_path / "nope.toml")


def test_groups_expand_in_file_order_with_defaults() -> None:
    sc = parse_scenario(_doc(defaults={"compute": 50.0, "max-epsilon": 3.0},
                             sites=[{"count": 2, "group": "a"},
                                    {"group": "b", "compute": 9.0, "behaviour": "free-rider"}]))
    assert sc.num_sites == 3
    assert [sc.site(k).group for k in range(3)] == ["a", "a", "b"]
    assert sc.site(0).compute == 50.0 and sc.site(2).compute == 9.0
    assert sc.site(2).max_epsilon == 3.0
    assert sc.roles() == {"honest": 2, "free-rider": 1}
    with pytest.raises(ConfigError, match=r"site index must be in \[0, 2\]"):
        sc.site(3)


def test_builtin_scenarios_load_and_match_the_issue() -> None:
    names = builtin_scenarios()
    assert set(names) == {"hospitals", "cross-device-1000", "cross-device-10k", "poisoning",
                          "hostile-replies"}
    hosp = load_scenario("hospitals")
    s = hosp.settings(run_dir="/tmp/x")
    assert hosp.num_sites == 10 and s.dp and s.he and hosp.data.partition == "dirichlet"
    assert sum(1 for k in range(10) if hosp.site(k).uplink_mbps <= 10) == 2
    xd = load_scenario("cross-device-1000")
    assert xd.num_sites == 1000 and xd.settings(run_dir="/x").fraction_train == 0.1
    assert all(xd.site(k).dropout == 0.2 for k in (0, 999))
    big = load_scenario("cross-device-10k")  # ten times the phones, the same sampled
    assert big.num_sites == 10_000 and big.data == xd.data
    assert round(big.settings(run_dir="/x").fraction_train * 10_000) == 100
    poison = load_scenario("poisoning")
    attackers = sum(n for role, n in poison.roles().items() if role != "honest")
    assert poison.num_sites == 10 and 1 <= attackers <= 3
    hostile = load_scenario("hostile-replies")
    assert hostile.settings(run_dir="/x").he and hostile.roles()["honest"] == 5
    from simulations.hostile import REPLY_ATTACKS
    assert set(hostile.roles()) - {"honest"} == set(REPLY_ATTACKS)  # every reply attack
    # a user copies one as a template: the file is plain TOML next to the package
    assert tomllib.loads(builtin_path("poisoning").read_text())["name"] == "poisoning"


def test_forged_ciphertexts_need_encryption() -> None:
    sc = parse_scenario(_doc(sites=[{"count": 3}, {"behaviour": "raw-slots"}]))
    with pytest.raises(ConfigError, match="raw-slots forges ciphertexts and needs he = true"):
        sc.settings(run_dir="/x")


def test_compiled_scenario_round_trips(tmp_path: Path) -> None:
    sc = parse_scenario(_doc(sites=[{"count": 2, "labels": [1, 2]}, {"behaviour": "scale"}]))
    save_compiled(sc, tmp_path / "scenario.json")
    back = load_compiled(str(tmp_path / "scenario.json"))
    assert back.to_json() == sc.to_json() and back.fingerprint() == sc.fingerprint()


# -- partitions ------------------------------------------------------------------------
def _partition(labels: np.ndarray, n: int, alpha: float, seed: int = 0, **kw: Any) -> np.ndarray:
    return site_partition(labels, kinds=kw.get("kinds", ["dirichlet"] * n),
                          alphas=np.full(n, alpha), quantities=kw.get("q", np.ones(n)),
                          allowed=kw.get("allowed", [()] * n), seed=seed)


@settings(max_examples=25, deadline=None)
@given(n_sites=st.integers(1, 40), alpha=st.floats(0.05, 100.0), seed=st.integers(0, 10**6),
       iid=st.booleans())
def test_every_sample_is_in_exactly_one_site(n_sites: int, alpha: float, seed: int,
                                             iid: bool) -> None:
    labels = np.random.default_rng(seed).integers(0, 10, size=600)
    owners = _partition(labels, n_sites, alpha, seed,
                        kinds=["iid" if iid else "dirichlet"] * n_sites)
    assert owners.shape == labels.shape and owners.min() >= 0 and owners.max() < n_sites
    parts = [np.flatnonzero(owners == k) for k in range(n_sites)]
    assert sum(len(p) for p in parts) == len(labels)  # disjoint and complete by construction
    assert min(len(p) for p in parts) >= min(10, len(labels) // n_sites)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = get_task("digits").embedded().y
    skew = {}
    for alpha in (100.0, 1.0, 0.1):
        vals = []
        for seed in range(3):
            owners = _partition(labels, 10, alpha, seed)
            vals.append(label_skew(labels, [np.flatnonzero(owners == k) for k in range(10)]))
        skew[alpha] = float(np.mean(vals))
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[100.0] < 0.1 and skew[0.1] > 0.5


def test_fixed_labels_and_quantity_skew() -> None:
    labels = np.repeat(np.arange(4), 250)
    owners = _partition(labels, 3, 1.0, kinds=["iid"] * 3, q=np.array([1.0, 1.0, 2.0]),
                        allowed=[(0, 1), (), ()])
    assert set(labels[owners == 0]) <= {0, 1}
    sizes = np.bincount(owners, minlength=3)
    assert sizes[2] > sizes[1]  # twice the weight, more data
    with pytest.raises(ValueError, match="no site may hold label 3"):
        _partition(labels, 2, 1.0, allowed=[(0, 1), (2,)])


def test_a_site_that_cannot_get_data_is_named() -> None:
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match="would hold no data"):
        _partition(labels, 65, 0.05, allowed=[(0,)] * 60 + [()] * 5)
    sc = parse_scenario(_doc(data={"task": "digits", "alpha": 0.05},
                             sites=[{"count": 3}, {"group": "zeros", "count": 200,
                                                   "labels": [0]}]))
    with pytest.raises(ConfigError, match=r"of group 'zeros' .*would hold no data"):
        sc.owners(get_task("digits").embedded().y, seed=0)


def test_restricted_sites_are_filled_before_the_unrestricted_ones() -> None:
    from fedvault_tasks.partition import _fill_small

    # site 0 may hold anything, site 1 only label 1, and site 2 owns everything:
    # filling site 0 first could take the only label-1 sample site 1 can use
    owners = np.array([2, 2, 2])
    _fill_small(owners, np.array([0, 1, 0]), [set(), {1}, set()], 1, 3)
    assert owners[1] == 1 and np.bincount(owners, minlength=3).min() == 1


@pytest.mark.parametrize("restricted", [False, True])
def test_partition_of_1000_sites(restricted: bool) -> None:
    # (its speed is bench/scale.py's business, not a unit test's)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=100_000)
    q = rng.lognormal(0, 3, size=1000)
    allowed = [(int(rng.integers(0, 10)),) if restricted and k % 2 else () for k in range(1000)]
    owners = _partition(labels, 1000, 0.1, q=q, allowed=allowed)
    assert np.bincount(owners, minlength=1000).min() >= 10
    for k in range(1, 1000, 2 if restricted else 1000):
        assert set(labels[owners == k]) <= set(allowed[k] or range(10))


def test_scenario_partition_is_seeded() -> None:
    sc = parse_scenario(_doc(data={"task": "digits", "quantity-skew": 0.5}))
    y = get_task("digits").embedded().y
    assert np.array_equal(sc.owners(y, seed=3), sc.owners(y, seed=3))
    assert not np.array_equal(sc.owners(y, seed=3), sc.owners(y, seed=4))


# -- the simulated clock -----------------------------------------------------------------
def test_clock_matches_a_hand_computed_round() -> None:
    fast = Link(uplink_mbps=100.0, downlink_mbps=100.0, latency_ms=10.0, compute=1000.0)
    slow = Link(uplink_mbps=10.0, downlink_mbps=20.0, latency_ms=50.0, compute=250.0)
    # fast: 0.01 + 8*1e6/1e8 (0.08) + 2000/1000 (2) + 0.01 + 8*5e5/1e8 (0.04) = 2.14 s
    a = Exchange(link=fast, bytes_down=1_000_000, bytes_up=500_000, examples=2000)
    # slow: 0.05 + 8e6/2e7 (0.4) + 1000/250 (4) + 0.05 + 4e6/1e7 (0.4) = 4.9 s
    b = Exchange(link=slow, bytes_down=1_000_000, bytes_up=500_000, examples=1000)
    assert site_seconds(a) == pytest.approx(2.14)
    assert site_seconds(b) == pytest.approx(4.9)
    pt = phase_seconds([a, b], timeout=60.0)
    assert pt.seconds == pytest.approx(4.9) and pt.timed_out == ()
    # a dropped site is waited for until the timeout
    dropped = Exchange(link=fast, bytes_down=1_000_000, dropped=True)
    assert phase_seconds([a, dropped], timeout=60.0).seconds == 60.0
    # the slow site misses a 3-second deadline
    late = phase_seconds([a, b], timeout=3.0)
    assert late.seconds == 3.0 and late.timed_out == (1,)
    with pytest.raises(ValueError, match="uplink_mbps must be > 0"):
        Link(uplink_mbps=0, downlink_mbps=1, latency_ms=0, compute=1)


# -- fates and attacks ---------------------------------------------------------------------
def test_fates_are_deterministic_and_follow_the_probabilities() -> None:
    sc = parse_scenario(_doc(sites=[{"dropout": 0.2, "availability": 0.9,
                                     "dropout-mode": "mid-upload"}]))
    p = sc.site(0)
    fates = [fate(p, seed=7, site=k, server_round=r) for k in range(200) for r in range(1, 11)]
    assert fates == [fate(p, seed=7, site=k, server_round=r)
                     for k in range(200) for r in range(1, 11)]
    share = {f: fates.count(f) / len(fates) for f in (ONLINE, OFFLINE, DROPPED_MID_UPLOAD)}
    assert share[OFFLINE] == pytest.approx(0.1, abs=0.03)
    assert share[DROPPED_MID_UPLOAD] == pytest.approx(0.9 * 0.2, abs=0.03)
    assert DROPPED_BEFORE not in fates


def test_tamper_state_sign_flip_scale_and_free_rider() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    tamper_state(g, model, behaviour="sign-flip", scale=1.0)
    for k in g:
        assert torch.allclose(model.state_dict()[k] - g[k], -(trained[k] - g[k]))
    model.load_state_dict(trained)
    tamper_state(g, model, behaviour="scale", scale=10.0)
    for k in g:
        assert torch.allclose(model.state_dict()[k] - g[k], 10 * (trained[k] - g[k]), atol=1e-6)
    model.load_state_dict(trained)
    tamper_state(g, model, behaviour="free-rider", scale=1.0)
    for k in g:
        assert torch.equal(model.state_dict()[k], g[k])


def test_backdoor_poisons_half_the_samples() -> None:
    t = Table(x=np.zeros((40, 64), np.float32), y=np.arange(40) % 10)
    b = backdoor_table(t, target=7, seed=0)
    poisoned = np.flatnonzero(b.x[:, -1] != 0)
    assert len(poisoned) == 20 and (b.y[poisoned] == 7).all()


def _write(tmp_path: Path, behaviour: str, **extra: Any) -> str:
    sc = parse_scenario(_doc(sites=[{"behaviour": behaviour, **extra}, {"count": 3}]))
    path = tmp_path / f"{behaviour}.json"
    save_compiled(sc, path)
    return str(path)


def _train_site0(tmp_path: Path, scenario: str, g: ArrayRecord) -> tuple[Message, Context]:
    run: dict[str, bool | float | int | str] = {
        "run-dir": str(tmp_path / "run"), "dp": False, "scenario": scenario,
        "num-server-rounds": 2}
    app = build_client_app(mods=[simulation_mod(scenario, 0)],
                           behaviour=ScenarioBehaviour(RunSettings.from_config(run)),
                           simulated=True)
    msg = Message(content=RecordDict({"arrays": g, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 1, "batch-size": 64, "learning-rate": 0.1,
         "momentum": 0.0})}), dst_node_id=11, message_type="train")
    ctx = Context(run_id=1, node_id=11, node_config={"partition-id": 0, "num-partitions": 4},
                  state=RecordDict(), run_config=run)
    return app(msg, ctx), ctx


@pytest.mark.usefixtures("flower_identity")
def test_a_sign_flipper_really_sends_the_negated_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = ArrayRecord(get_task("digits").build_model().state_dict())
    honest, ctx = _train_site0(tmp_path, _write(tmp_path, "honest"), g)
    flipped, _ = _train_site0(tmp_path, _write(tmp_path, "sign-flip"), g)
    free, _ = _train_site0(tmp_path, _write(tmp_path, "free-rider"), g)
    assert free.content.config_records["simulation"]["examples"] == 0  # no work done
    claimed = free.content.metric_records["metrics"]["num-examples"]
    assert isinstance(claimed, int | float) and claimed > 0  # yet claims it did
    sim: dict[str, Any] = dict(honest.content.config_records["simulation"])
    assert sim["site"] == 0 and sim["fate"] == ONLINE and int(sim["examples"]) > 0
    assert ctx.node_config["site-name"] == "site-0"  # the site's own node config
    gs = g.to_torch_state_dict()
    h = honest.content.array_records["arrays"].to_torch_state_dict()
    f = flipped.content.array_records["arrays"].to_torch_state_dict()
    r = free.content.array_records["arrays"].to_torch_state_dict()
    moved = False
    for k in gs:
        if torch.is_floating_point(gs[k]):
            assert torch.allclose(f[k] - gs[k], -(h[k] - gs[k]), atol=1e-6)
            moved |= bool((h[k] - gs[k]).abs().max() > 1e-4)
            assert torch.equal(r[k], gs[k])
    assert moved  # the honest update is not zero, so the check above means something


@pytest.mark.usefixtures("flower_identity")
def test_dropouts_reply_without_an_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = ArrayRecord(get_task("digits").build_model().state_dict())
    before, _ = _train_site0(tmp_path, _write(tmp_path, "honest", dropout=1.0), g)
    assert dict(before.content.config_records["simulation"])["fate"] == DROPPED_BEFORE
    assert not before.content.array_records
    mid, _ = _train_site0(tmp_path, _write(tmp_path, "honest", dropout=1.0,
                                           **{"dropout-mode": "mid-upload"}), g)
    sim: dict[str, Any] = dict(mid.content.config_records["simulation"])
    assert sim["fate"] == DROPPED_MID_UPLOAD and int(sim["bytes-lost"]) > 10_000
    assert not mid.content.array_records


def test_every_behaviour_has_an_attack_and_one_name_list() -> None:
    from simulations.behaviour import ATTACKS
    from simulations.scenario import BEHAVIOURS, Behaviour

    assert set(ATTACKS) == set(Behaviour) and BEHAVIOURS == tuple(b.value for b in Behaviour)
    assert ATTACKS[Behaviour.HONEST].data == "clean" and ATTACKS[Behaviour.HONEST].update is None

"""Run fedvault's ServerApp and ClientApp on Flower's Simulation Engine (Ray backend).

The very same apps as a real deployment (``server.app``, ``client.app``); the
only difference is that run-config values arrive as overrides, because
``flwr.simulation.run_simulation`` carries no run config. Progress is read from
the run's own event log, exactly as ``fedvault rehearse`` reads it from a real
SuperLink's ServerApp process.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import build_client_app
from client.release import decrypt_model
from fedvault_tasks.datasets import central_test_table, pooled_table
from fedvault_tasks.partition import partition_indices
from fedvault_tasks.tasks import evaluate, get_task
from privacy.he import bfv_params_for
from privacy.provision import provision
from protocols import summary as run_summary
from protocols.config import RunSettings
from protocols.errors import ConfigError, FedvaultError, SimulationError
from protocols.hashchain import follow_chain
from protocols.names import RunMode
from protocols.rundir import RunDirectory, check_output_dir
from protocols.summary import ReleasedModel, RunSummary
from server.app import build_server_app
from server.recorder import RunRecorder
from simulations.behaviour import SITE_QUERY, ScenarioBehaviour, answer_site_query, simulation_mod
from simulations.network import SimulatedGrid
from simulations.report import scenario_outputs
from simulations.scenario import Scenario, informative_features, load_compiled, save_compiled

ProgressCallback = Callable[[dict[str, Any]], None]


class _DropFlowerNoise(logging.Filter):
    """Flower's ``run_simulation`` logs a deprecation warning a user should not see."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("DEPRECATED FEATURE") or msg.startswith("FEATURE UPDATE"))


@contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Silence Flower's INFO chatter and its deprecation notice unless ``verbose``."""
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    filt = _DropFlowerNoise()
    flwr_logger.addFilter(filt)
    for h in flwr_logger.handlers:
        h.addFilter(filt)
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        flwr_logger.setLevel(old_level)
        flwr_logger.removeFilter(filt)
        for h in flwr_logger.handlers:
            h.removeFilter(filt)


def check_run(settings: RunSettings, sites: int) -> None:
    """Fail fast, before any process starts, on anything a run cannot run with."""
    if sites < 1:
        raise ConfigError(f"sites must be >= 1. Found {sites}.")
    if settings.min_sites > sites:
        raise ConfigError(
            f"min-sites ({settings.min_sites}) exceeds the number of sites ({sites})."
        )
    if not settings.run_dir:
        raise ConfigError("a run needs run-dir set.")
    check_output_dir(settings.run_dir, what="run directory")
    task = get_task(settings.task)
    pool, _ = pooled_table(task, settings)  # loads data-path: DataError if bad
    task.check_table(pool, num_features=settings.num_features, num_classes=settings.num_classes)
    task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    if len(pool) < sites:
        raise ConfigError(f"{len(pool)} training rows cannot be split across {sites} sites.")
    if settings.scenario:
        load_compiled(settings.scenario).owners(pool.y, seed=settings.seed)
    else:
        partition_indices(pool.y, sites, partitioner=settings.partitioner, alpha=settings.alpha,
                          seed=settings.seed)


def ensure_federation(settings: RunSettings, sites: int, root: Path) -> RunSettings:
    """With ``he`` on and no federation given, provision one under ``root``."""
    if not settings.he or settings.he_federation:
        return settings

    fed = root / "federation"
    provision(fed, sites=sites, params=bfv_params_for(sites))
    return settings.replace(he_federation=str(fed.resolve()))


def tail_events(path: Path, stop: threading.Event, on_event: ProgressCallback,
                poll: float = 0.2) -> None:
    """Call ``on_event`` for each new event appended to ``path`` until ``stop`` is set."""
    offset = 0
    while True:
        done = stop.is_set()
        if path.exists():
            try:
                entries, offset = follow_chain(path, offset)
            except OSError:
                entries = []
            for e in entries:
                on_event(e)
        if done:
            return
        stop.wait(poll)


def simulate(
    settings: RunSettings,
    *,
    sites: int,
    cpus_per_site: float = 1.0,
    on_event: ProgressCallback | None = None,
    verbose: bool = False,
    ray_address: str = "",
) -> RunSummary:
    """Run a simulated federation of ``sites`` sites; return its ``summary.json``.

    With a scenario (``settings.scenario``, see :func:`simulate_scenario`), the sites
    get its links, failures and behaviours: a simulated network wraps the server's
    grid and a mod and a behaviour hook wrap the ClientApp. ``ray_address`` runs the simulated sites
    on an existing Ray cluster instead of a local one."""
    from flwr.simulation import run_simulation

    if not (math.isfinite(cpus_per_site) and cpus_per_site > 0):
        raise ConfigError(f"cpus-per-site must be > 0. Found {cpus_per_site:g}.")
    if not ray_address and cpus_per_site > (os.cpu_count() or 1):
        raise ConfigError(f"cpus-per-site {cpus_per_site:g} exceeds this machine's "
                          f"{os.cpu_count() or 1} CPUs: Ray could not place a single site.")
    check_run(settings, sites)
    run_dir = RunDirectory(Path(settings.run_dir))
    if run_dir.events.exists():
        raise ConfigError(f"run directory {str(run_dir.root)!r} already holds a run.")
    settings = ensure_federation(settings, sites, run_dir.root)
    overrides = settings.to_config()
    scenario = load_compiled(settings.scenario) if settings.scenario else None
    if scenario is None:
        server_app = build_server_app(overrides, mode=RunMode.SIMULATION)
        client_app = build_client_app(overrides, simulated=True)
    else:
        server_app, client_app = _scenario_apps(scenario, settings, overrides)
    backend_config = ray_backend_config(cpus_per_site=cpus_per_site, verbose=verbose,
                                        ray_address=ray_address)
    stop = threading.Event()
    tail: threading.Thread | None = None
    if on_event is not None:
        tail = threading.Thread(target=tail_events, args=(run_dir.events, stop, on_event),
                                daemon=True)
        tail.start()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    t0 = time.monotonic()
    try:
        with quiet_flower(verbose):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=sites,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    except FedvaultError:
        raise
    except Exception as exc:
        if run_dir.summary.exists():
            summ = run_dir.read_summary()
            if summ.get("error"):
                raise SimulationError(f"simulation failed: {summ['error']}") from exc
        raise SimulationError(f"simulation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        stop.set()
        if tail is not None:
            tail.join(timeout=5)
    if not run_dir.summary.exists():
        raise SimulationError("simulation ended without a summary: the ServerApp did not run "
                            "(see --verbose for Flower's log).")
    summary = run_summary.read(run_dir)
    blocks: dict[str, Any] = {"simulation_wall_seconds": round(time.monotonic() - t0, 3)}
    if settings.he and settings.central_eval and summary["status"] == "completed":
        blocks["released_model"] = evaluate_release(settings, run_dir)
    if scenario is not None:
        view = cast(RunSummary, {**summary, **blocks})
        blocks.update(scenario_outputs(view, scenario, settings, run_dir))
    return run_summary.amend(run_dir, summary, **blocks)


def ray_backend_config(*, cpus_per_site: float, verbose: bool, ray_address: str = ""
                       ) -> dict[str, Any]:
    """Flower's Ray backend settings: one actor per ``cpus_per_site`` CPUs, on this
    machine's cores or on the cluster at ``ray_address`` (whose own size then counts)."""
    init: dict[str, Any] = {
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
        "include_dashboard": False,
    }
    if ray_address:
        init["address"] = ray_address
    else:
        init["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
            "init_args": init}


def _scenario_apps(scenario: Scenario, settings: RunSettings, overrides: dict[str, Any]
                   ) -> tuple[ServerApp, ClientApp]:

    def wrap(grid: Grid, recorder: RunRecorder) -> Grid:
        return SimulatedGrid(grid, scenario, recorder)

    server_app = build_server_app(overrides, mode=RunMode.SIMULATION, wrap_grid=wrap)
    behaviour = (ScenarioBehaviour(settings) if any(g.is_attacker() for g in scenario.groups)
                 else None)
    client_app = build_client_app(overrides, mods=[simulation_mod(settings.scenario,
                                                                  settings.seed, settings)],
                                  behaviour=behaviour, simulated=True)
    client_app.query(SITE_QUERY.split(".")[1])(answer_site_query)
    return server_app, client_app


def prepare_scenario(scenario: Scenario, run_dir: Path) -> RunSettings:
    """Write the scenario (source and compiled) and any generated data into the run
    directory; return the run's settings."""
    rd = RunDirectory(run_dir)
    if rd.events.exists():
        raise ConfigError(f"run directory {str(rd.root)!r} already holds a run.")
    rd.create()
    if scenario.source and Path(scenario.source).exists():
        shutil.copyfile(scenario.source, rd.root / "scenario.toml")
    compiled = rd.root / "scenario.json"
    save_compiled(scenario, compiled)
    settings = scenario.settings(run_dir=str(rd.root.resolve()),
                                 scenario_path=str(compiled.resolve()))
    if scenario.data.generate:
        data = generate_table(rd.root / "data.npz", *scenario.data.generate, seed=settings.seed)
        settings = settings.replace(data_path=str(data.resolve()))
    return settings


def generate_table(path: Path, rows: int, features: int, classes: int, *, seed: int) -> Path:
    """A synthetic classification table (scikit-learn's ``make_classification``), for
    scenarios with more sites than the embedded datasets have rows."""
    import numpy as np
    from sklearn.datasets import make_classification


    informative = informative_features(features)
    x, y = make_classification(n_samples=rows, n_features=features, n_informative=informative,
                               n_redundant=0, n_classes=classes, n_clusters_per_class=1,
                               class_sep=1.5, random_state=seed)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def simulate_scenario(scenario: Scenario, *, out: Path, cpus_per_site: float = 1.0,
                      on_event: ProgressCallback | None = None, verbose: bool = False,
                      ray_address: str = "") -> RunSummary:
    """Run a scenario in run directory ``out``; return its ``summary.json``."""
    settings = prepare_scenario(scenario, out)
    return simulate(settings, sites=scenario.num_sites, cpus_per_site=cpus_per_site,
                    on_event=on_event, verbose=verbose, ray_address=ray_address)


def evaluate_release(settings: RunSettings, run_dir: RunDirectory) -> ReleasedModel:
    """Encrypted runs: play the key holder (site-0), release the final model (recorded in
    releases.jsonl) and evaluate it on the central test split, which the server could
    not do. A real federation does this with ``fedvault model decrypt``."""
    import torch


    out = run_dir.root / "released-model.pt"
    entry = decrypt_model(run_dir.root, federation=settings.he_federation, site="site-0",
                          out=out)
    task = get_task(settings.task)
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    model.load_state_dict(torch.load(out, weights_only=True))
    test = central_test_table(task, settings)
    if test is None:  # pragma: no cover - the caller checks central_eval
        raise ConfigError("central evaluation is off: nothing to score the release on.")
    loss, acc = evaluate(model, test)
    return {"round": entry["round"], "decrypted_by": "site-0", "path": str(out),
            "central_accuracy": round(acc, 6), "central_loss": round(loss, 6)}

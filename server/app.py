"""fedvault's ServerApp: samples sites, aggregates, evaluates, records the run.

Flower loads ``server.app:app`` (``flwr run``, SuperLink deployments).
``fedvault simulate`` builds the same app with :func:`build_server_app`, passing
run-config overrides and ``mode="simulation"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedvault_tasks.datasets import central_test_table
from fedvault_tasks.tasks import Table, Task, evaluate, get_task
from privacy.federation import load_context
from privacy.ledger import PrivacyLedger
from protocols.config import RunSettings
from protocols.errors import ConfigError, FedvaultError
from protocols.he_update import is_encrypted
from protocols.messages import TrainConfig
from protocols.names import RunMode
from protocols.run_events import RunEvent
from protocols.rundir import RunDirectory, default_run_dir
from server.client_level_dp import ClientLevelDP
from server.he_strategy import EncryptedFedAvg
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg
from server.transport import MIN_REPLY_BYTES, limit_reply_bytes

logger = logging.getLogger("fedvault.server")


def make_central_evaluator(
    task: Task, settings: RunSettings, recorder: RunRecorder, test: Table | None
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Flower calls this after each round (and for round 0); it evaluates centrally
    when a test split exists and records the round either way."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        central: tuple[float, float] | None = None
        if test is not None and not is_encrypted(arrays):  # unreadable here once encrypted
            model = task.build_model(num_features=settings.num_features,
                                     num_classes=settings.num_classes)
            model.load_state_dict(arrays.to_torch_state_dict())
            central = evaluate(model, test)
        recorder.end_round(server_round, arrays, central)
        if central is None:
            return None
        return MetricRecord({"loss": central[0], "accuracy": central[1]})

    return evaluate_fn


GridWrapper = Callable[[Grid, RunRecorder], Grid]


def build_strategy(settings: RunSettings, *, recorder: RunRecorder, run_id: int,
                   num_values: int, sampling_seed: int | None) -> FedVaultFedAvg:
    """The run's strategy, built once: encrypted FedAvg when ``he`` is on (it holds the
    federation's public context only), else plaintext FedAvg; Flower's sampling
    options from the run config either way."""
    flower = {"fraction_train": settings.fraction_train,
              "fraction_evaluate": settings.fraction_evaluate,
              "min_train_nodes": settings.min_sites, "min_evaluate_nodes": 1,
              "min_available_nodes": settings.min_sites}
    if not settings.he:  # (RunSettings already refuses he together with client-dp)
        return FedVaultFedAvg(recorder=recorder, min_sites=settings.min_sites,
                              sampling_seed=sampling_seed,
                              max_examples=settings.max_examples_per_site,
                              max_weight_share=settings.max_weight_share, **flower)
    if not settings.he_federation:
        raise ConfigError("he = true needs he-federation: a directory made by "
                          "`fedvault provision`.")
    he = load_context(settings.he_federation, site=None)
    recorder.he_params = {"scheme": he.params.scheme,
                          "poly_modulus_degree": he.params.poly_modulus_degree,
                          "fingerprint": he.fingerprint}
    return EncryptedFedAvg(he=he, num_values=num_values, run_id=run_id, recorder=recorder,
                           min_sites=settings.min_sites, sampling_seed=sampling_seed,
                           weight_scale=settings.he_weight_scale,
                           max_examples=settings.max_examples_per_site,
                           max_weight_share=settings.max_weight_share, **flower)


def run_server(grid: Grid, context: Context, settings: RunSettings, *, mode: str,
               wrap_grid: GridWrapper | None = None) -> None:
    """One federated run: the body of the ServerApp's main. ``wrap_grid`` puts a
    simulated network between the strategy and Flower's grid (simulations)."""
    task = get_task(settings.task)
    torch.manual_seed(settings.seed)
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    root = Path(settings.run_dir) if settings.run_dir else default_run_dir(context.run_id)
    recorder = RunRecorder(RunDirectory(root), settings=settings, run_id=context.run_id, mode=mode)
    try:
        deployment = mode == RunMode.DEPLOYMENT
        test = central_test_table(task, settings, deployment=deployment)
        if deployment and settings.central_eval and test is None:
            recorder.event(
                RunEvent.CENTRAL_EVALUATION_OFF, reason="no central-test-path: in a deployment the "
                "server evaluates only on the central team's own test data; the accuracy "
                "is the sites' federated evaluation")
        initial = ArrayRecord(model.state_dict())
        if wrap_grid is not None:
            grid = wrap_grid(grid, recorder)
        sampling_seed = settings.seed if wrap_grid is not None else None
        recorder.start(
            # a simulated network knows its whole federation; get_node_ids() gives
            # only the sites online now
            num_sites=getattr(grid, "num_sites", None) or len(list(grid.get_node_ids())),
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        train_config = TrainConfig(local_epochs=settings.local_epochs,
                                   batch_size=settings.batch_size,
                                   learning_rate=settings.learning_rate,
                                   momentum=settings.momentum).to_record()
        strategy = build_strategy(settings, recorder=recorder, run_id=context.run_id,
                                  num_values=sum(int(v.numel())
                                                 for v in model.state_dict().values()),
                                  sampling_seed=sampling_seed)
        strategy.global_arrays = initial
        strategy.round_timeout = settings.round_timeout
        budget = strategy.reply_byte_budget()
        if limit_reply_bytes(grid, budget):  # a deployment: Flower's HttpGrid
            recorder.event(RunEvent.REPLY_BUDGET, bytes=max(budget, MIN_REPLY_BYTES))
        runner: FedVaultFedAvg | ClientLevelDP = strategy
        if settings.client_dp:
            runner = ClientLevelDP(
                strategy, noise_multiplier=settings.client_dp_noise_multiplier,
                clipping_norm=settings.client_dp_clipping_norm,
                ledger=PrivacyLedger(recorder.dir.root / "server-ledger.jsonl",
                                     accountant=settings.accountant, site_secret=False),
                federation=settings.federation, run_id=str(context.run_id),
                delta=settings.client_dp_delta, max_epsilon=settings.client_dp_max_epsilon)
        runner.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout,
            train_config=train_config,
            evaluate_fn=make_central_evaluator(task, settings, recorder, test),
        )
    except FedvaultError as exc:
        recorder.finish(status="failed", error=str(exc))
        raise
    except BaseException as exc:
        recorder.finish(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    recorder.conclude()


def build_server_app(
    overrides: Mapping[str, Any] | None = None, *, mode: str = RunMode.DEPLOYMENT,
    wrap_grid: GridWrapper | None = None,
) -> ServerApp:
    """The ServerApp; ``overrides`` win over the run config and ``wrap_grid`` adds a
    simulated network (both used by simulations)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_config({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, context, settings, mode=mode, wrap_grid=wrap_grid)

    return app


app = build_server_app()

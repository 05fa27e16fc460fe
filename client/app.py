"""fedvault's ClientApp: runs at each site, next to the site's data.

Flower loads ``client.app:app``. ``fedvault simulate`` builds the same app with
:func:`build_client_app` and passes run-config overrides, because Flower's
Python simulation entry point carries no run config of its own.

Train message in: ``arrays`` (global model) and ``config`` (``server-round``,
``local-epochs``, ``batch-size``, ``learning-rate``, ``momentum``). Reply:
``arrays`` (the locally trained model) and ``metrics`` (``train-loss``,
``num-examples``, ``steps``). Evaluate reply: ``metrics`` (``eval-loss``,
``eval-acc``, ``num-examples``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import resolve_site_data
from client.training import evaluate, train_local
from fedvault.errors import ConfigError
from fedvault.tasks import get_task
from protocols.config import RunSettings


def _settings(context: Context, overrides: Mapping[str, Any] | None) -> RunSettings:
    return RunSettings.from_config({**dict(context.run_config), **dict(overrides or {})})


def _model_from(msg: Message, settings: RunSettings) -> torch.nn.Module:
    task = get_task(settings.task)
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    if "arrays" not in msg.content.array_records:
        raise ConfigError("the server's message carries no 'arrays' record (the global model).")
    arrays = msg.content.array_records["arrays"]
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"the global model does not fit task {task.name!r}: {exc}") from exc
    return model


def _cfg(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


def _train_seed(settings: RunSettings, server_round: int, context: Context) -> int:
    # Deterministic per (run seed, round, site): simulated sites are keyed by their
    # partition id, which, unlike Flower's node id, is the same in every run.
    site_key = int(context.node_config.get("partition-id", context.node_id))
    return (settings.seed * 100_003 + server_round * 1_009 + site_key) % (2**31)


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` win over the run config (used by simulations)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        settings = _settings(context, overrides)
        site = resolve_site_data(settings, context.node_config)
        model = _model_from(msg, settings)
        cfg = _cfg(msg)
        server_round = int(cfg.get("server-round", 0))  # type: ignore[arg-type]
        result = train_local(
            model,
            site.train,
            epochs=int(cfg.get("local-epochs", settings.local_epochs)),  # type: ignore[arg-type]
            batch_size=int(cfg.get("batch-size", settings.batch_size)),  # type: ignore[arg-type]
            learning_rate=float(cfg.get("learning-rate", settings.learning_rate)),  # type: ignore[arg-type]
            momentum=float(cfg.get("momentum", settings.momentum)),  # type: ignore[arg-type]
            seed=_train_seed(settings, server_round, context),
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord(
                    {
                        "train-loss": result.loss,
                        "num-examples": result.num_examples,
                        "steps": result.steps,
                    }
                ),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        settings = _settings(context, overrides)
        site = resolve_site_data(settings, context.node_config)
        model = _model_from(msg, settings)
        loss, acc = evaluate(model, site.validation)
        metrics = MetricRecord(
            {"eval-loss": loss, "eval-acc": acc, "num-examples": len(site.validation)}
        )
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = build_client_app()

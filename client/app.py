"""fedvault's ClientApp: runs at each site, next to the site's data.

Flower loads ``client.app:app``. ``fedvault simulate`` builds the same app with
:func:`build_client_app` and passes run-config overrides, because Flower's
Python simulation entry point carries no run config of its own.

Train message in: ``arrays`` (global model) and ``config`` (``server-round``,
``local-epochs``, ``batch-size``, ``learning-rate``, ``momentum``). Reply:
``arrays`` or ``he-update`` (the locally trained model, after DP-SGD),
``metrics`` (``num-examples``, ``steps``: the planned count) and ``privacy``;
or ``refusal``. No training loss: it is an exact statistic of the data, outside
epsilon. Evaluate reply: ``metrics`` (``eval-loss``, ``eval-acc``,
``num-examples``) only where the site's node config allows releasing them
(``release-eval-metrics``), else ``declined``. Every message is a type of
:mod:`protocols.messages`; docs/reference/what-leaves-a-site.md lists every field
with its bound (tests/test_messages.py holds the two together).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.budget import SitePolicy, check_request, noise_multiplier_for_run, site_policy
from client.dp_sgd import plan_round, train_dp
from client.he_client import (
    encrypt_update,
    load_encrypted_global,
    remember_global,
    site_context,
)
from client.site_data import SiteData, resolve_site_data
from client.training import TrainResult, train_local
from fedvault_tasks.tasks import Table, evaluate, flatten, get_task
from privacy.ledger import PrivacyLedger
from privacy.noise import SecureUniform
from privacy.site_secret import SiteSecret, secret_path_for
from protocols.config import RunSettings
from protocols.errors import (
    AggregateRefused,
    ConfigError,
    HEError,
    IntegrityError,
    PrivacyRefused,
)
from protocols.hashchain import HashChainLog, utc_now
from protocols.messages import (
    ARRAYS,
    HE_GLOBAL,
    HE_UPDATE,
    METRICS,
    PRIVACY,
    Declined,
    EvalConfig,
    EvalMetrics,
    GlobalRefused,
    Refusal,
    ReplyPrivacy,
    TrainConfig,
    TrainMetrics,
)
from protocols.node_config import NodeConfig
from protocols.run_events import IncidentEvent

logger = logging.getLogger("fedvault.client")


class SiteBehaviour(Protocol):
    """What a simulated site does besides honest training (``simulations.behaviour``):
    it may poison the data it trains on and tamper with the model it then sends.
    Deployments have none; a real hostile site would run modified code instead."""

    def training_data(self, table: Table, context: Context, server_round: int) -> Table: ...

    def tamper(self, global_state: Mapping[str, torch.Tensor], model: torch.nn.Module,
               context: Context, server_round: int) -> None: ...

    def free_rides(self, context: Context, server_round: int) -> bool: ...


def _settings(context: Context, overrides: Mapping[str, Any] | None) -> RunSettings:
    return RunSettings.from_config({**dict(context.run_config), **dict(overrides or {})})


def _model_from(msg: Message, settings: RunSettings, node: NodeConfig,
                context: Context) -> torch.nn.Module:
    """The global model the server sent; an encrypted one is decrypted and checked first
    (``AggregateRefused`` when the check fails: nothing is trained on or released)."""
    task = get_task(settings.task)
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    if HE_GLOBAL in msg.content.config_records:
        he = site_context(settings, node)
        load_encrypted_global(model, msg.content.config_records[HE_GLOBAL], he,
                              min_sites=max(settings.min_sites,
                                            node.aggregate_min_sites or 1),
                              max_change=settings.he_max_change,
                              state=context.state)
        return model
    if ARRAYS not in msg.content.array_records:
        raise ConfigError(f"the server's message carries no {ARRAYS!r} record "
                          "(the global model).")
    arrays = msg.content.array_records[ARRAYS]
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"the global model does not fit task {task.name!r}: {exc}") from exc
    if settings.he:  # the plaintext initial model: the base of the next round's check
        remember_global(context.state, flatten(model.state_dict()))
    return model


def _global_version(msg: Message) -> int:
    rec = msg.content.config_records.get(HE_GLOBAL)
    v = rec.get("round", 0) if rec is not None else 0
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _refuse_global(msg: Message, policy: SitePolicy, exc: AggregateRefused,
                   context: Context) -> Message:
    """Record the refused global model as an incident at the site (a hash-chained log
    beside the ledger) and tell the server, which rolls back to the last accepted one."""
    version = _global_version(msg)
    path = incidents_path(policy.ledger_path)
    HashChainLog(path).append(IncidentEvent.GLOBAL_MODEL_REFUSED, run_id=str(context.run_id),
                              version=version, site=policy.site_name, reason=exc.reason)
    logger.warning("refusing global model version %s: %s (incident recorded in %s)",
                   version, exc.reason, path)
    return Message(content=GlobalRefused(reason=exc.reason, site=policy.site_name,
                                         version=version).to_content(), reply_to=msg)


def incidents_path(ledger_path: str) -> Path:
    """The site's incident log: ``LEDGER.incidents.jsonl`` beside its ledger."""
    p = Path(ledger_path)
    return p.with_name(p.stem + ".incidents.jsonl")


def _train_seed(settings: RunSettings, server_round: int, node: NodeConfig,
                context: Context) -> int:
    # Used only when secure mode is off (then the ledger marks the round insecure):
    # deterministic per (run seed, round, site); simulated sites are keyed by their
    # partition id, which, unlike Flower's node id, is the same in every run.
    # SeedSequence mixes the three without the collisions of a linear formula (with
    # 1,009+ sites, site k + 1009 in round r would share site k's stream in round r+1).
    site_key = node.partition_id if node.partition_id is not None else int(context.node_id)
    state = np.random.SeedSequence([settings.seed, server_round, site_key]).generate_state(1)
    return int(state[0]) % (2**31)


def _weight_scale(request: TrainConfig) -> int:
    """The round's HE weight scale, as the server announced it in the config."""
    if request.he_weight_scale is None:
        raise HEError("the training config's he-weight-scale must be an integer. "
                      "Found None.")
    return request.he_weight_scale


def _train_reply(msg: Message, model: torch.nn.Module, result: TrainResult,
                 privacy: ReplyPrivacy | None, *, settings: RunSettings, node: NodeConfig,
                 context: Context, request: TrainConfig) -> Message:
    server_round = request.server_round
    records: dict[str, Any] = {
        METRICS: TrainMetrics(num_examples=result.num_examples,
                              steps=result.steps).to_record(),
    }
    if settings.he:
        # DP-SGD already happened; now quantise, pack and encrypt (never plaintext).
        he = site_context(settings, node)
        # Stochastic rounding draws from the OS CSPRNG unless secure mode is off, when
        # it is seeded like the DP noise so that a run can be repeated exactly.
        rng = (SecureUniform() if settings.secure_mode else
               np.random.default_rng(_train_seed(settings, server_round, node, context)))
        records[HE_UPDATE] = encrypt_update(model, he, context=context,
                                              server_round=server_round,
                                              num_examples=result.num_examples,
                                              weight_scale=_weight_scale(request),
                                              rng=rng).to_record()
    else:
        records[ARRAYS] = ArrayRecord(model.state_dict())
    if privacy is not None:
        records[PRIVACY] = privacy.to_record()
    return Message(content=RecordDict(records), reply_to=msg)


def _refusal(msg: Message, policy: SitePolicy, reason: str, spent: float | None = None
             ) -> Message:
    """A reply that trains nothing and says why (the server logs and counts it)."""
    logger.warning("refusing round: %s", reason)
    return Message(content=Refusal(reason=reason, site=policy.site_name,
                                   epsilon_limit=policy.max_epsilon, delta=policy.delta,
                                   epsilon_spent=spent).to_content(), reply_to=msg)


def _site_key(policy: SitePolicy, settings: RunSettings, node: NodeConfig,
              context: Context) -> bytes:
    """The site's secret key (beside its ledger; created at first use from the OS
    CSPRNG). A *simulated* site in a run that exists to be repeated exactly (no DP,
    or ``--insecure-noise``) derives it from the run seed and its partition instead."""
    seeded = None
    if (not settings.secure_mode or not settings.dp) and node.simulated:
        pid = node.partition_id if node.partition_id is not None else context.node_id
        seeded = hashlib.sha256(f"fedvault-simulated-site/{settings.seed}/{pid}".encode()
                                ).digest()
    return SiteSecret.load_or_create(secret_path_for(policy.ledger_path), created=utc_now(),
                                     key=seeded).key


def _open_ledger(policy: SitePolicy) -> PrivacyLedger:
    return PrivacyLedger(policy.ledger_path, accountant=policy.accountant)


def _register(ledger: PrivacyLedger, policy: SitePolicy, site: SiteData) -> str:
    """Register the data in its budget scope; the keyed dataset id (what may leave)."""
    dataset = ledger.dataset_id(site.fingerprint)
    if policy.budget_scope != "site":
        ledger.declare_scope(policy.budget_scope, dataset=dataset,
                             declared_by="node-config budget-scope")
    ledger.register(dataset, scope=policy.budget_scope, source=site.source,
                    rows=len(site.train) + len(site.validation), fingerprint=site.fingerprint)
    return dataset


def _request(msg: Message, settings: RunSettings) -> TrainConfig:
    """What the server asks of this round (its ``config`` record, run-config defaults)."""
    return TrainConfig.from_content(msg.content, defaults=TrainConfig(
        local_epochs=settings.local_epochs, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, momentum=settings.momentum))


def train_round(msg: Message, context: Context, settings: RunSettings, node: NodeConfig,
                behaviour: SiteBehaviour | None = None) -> Message:
    """One training round at the site, start to end: load and register the data, then
    (with DP) plan → check → reserve → train → complete, or refuse and record why."""
    policy = site_policy(settings, node)
    site = resolve_site_data(settings, node, key=_site_key(policy, settings, node, context))
    try:
        model = _model_from(msg, settings, node, context)
    except AggregateRefused as exc:  # before the ledger: a refused model costs no epsilon
        return _refuse_global(msg, policy, exc, context)
    if settings.he:  # a site without its secret context stops before spending epsilon
        site_context(settings, node)
    request = _request(msg, settings)
    server_round = request.server_round
    seed = _train_seed(settings, server_round, node, context)
    run_id = str(context.run_id)
    train_table = site.train
    global_state: dict[str, torch.Tensor] = {}
    if behaviour is not None:
        train_table = behaviour.training_data(site.train, context, server_round)
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def tampered(result: TrainResult) -> TrainResult:
        if behaviour is not None:
            behaviour.tamper(global_state, model, context, server_round)
        return result

    if behaviour is not None and behaviour.free_rides(context, server_round):
        # sends the global model back untrained, claiming its examples
        return _train_reply(msg, model, TrainResult(loss=float("nan"), steps=0,
                                                    num_examples=len(site.train)),
                            privacy=None, settings=settings, node=node, context=context,
                            request=request)

    try:
        ledger = _open_ledger(policy)
    except IntegrityError as exc:
        # a ledger that cannot be trusted: train nothing, say why (nothing to record in)
        return _refusal(msg, policy, f"privacy ledger: {exc}")
    try:
        dataset = _register(ledger, policy, site)
    except IntegrityError as exc:
        return _refusal(msg, policy, f"privacy ledger: {exc}")
    except PrivacyRefused as exc:  # the data already draws on another budget scope
        ledger.refuse(policy.budget_scope, run_id=run_id, server_round=server_round,
                      reason=str(exc), delta=policy.delta, limit=policy.max_epsilon)
        return _refusal(msg, policy, str(exc))

    def refuse(reason: str) -> Message:
        entry = ledger.refuse(policy.budget_scope, run_id=run_id,
                              server_round=server_round, reason=reason,
                              delta=policy.delta, limit=policy.max_epsilon, dataset=dataset)
        return _refusal(msg, policy, reason, spent=float(entry["epsilon_spent"]))

    if not settings.dp:
        try:
            check_request(settings, policy, 0.0)
        except PrivacyRefused as exc:
            return refuse(str(exc))
        result = tampered(train_local(model, train_table, epochs=request.local_epochs,
                                      batch_size=request.batch_size,
                                      learning_rate=request.learning_rate,
                                      momentum=request.momentum, seed=seed,
                                      max_grad_norm=settings.max_grad_norm))
        return _train_reply(msg, model, result, privacy=None, settings=settings,
                            node=node, context=context, request=request)

    return _dp_round(msg, context, settings, node, policy, ledger, dataset,
                     model=model, table=train_table, num_examples=len(site.train),
                     request=request, seed=seed, run_id=run_id, refuse=refuse,
                     tampered=tampered)


def _dp_round(msg: Message, context: Context, settings: RunSettings, node: NodeConfig,
              policy: SitePolicy, ledger: PrivacyLedger, dataset: str, *,
              model: torch.nn.Module, table: Table, num_examples: int,
              request: TrainConfig, seed: int, run_id: str,
              refuse: Callable[[str], Message],
              tampered: Callable[[TrainResult], TrainResult]) -> Message:
    """DP-SGD for one round: plan (noise calibrated to the run's target) → check (the
    site's policy) → reserve (durably, in the ledger, before the first step) → train →
    complete."""
    server_round, lr, momentum = request.server_round, request.learning_rate, request.momentum
    plan = plan_round(num_examples=num_examples, batch_size=request.batch_size,
                      epochs=request.local_epochs,
                      noise_multiplier=1.0, max_grad_norm=settings.max_grad_norm)
    sigma = noise_multiplier_for_run(settings, policy, sample_rate=plan.sample_rate,
                                     steps_per_round=plan.steps)
    plan = dataclasses.replace(plan, noise_multiplier=sigma)
    try:
        check_request(settings, policy, sigma)
    except PrivacyRefused as exc:
        return refuse(str(exc))
    try:
        # Durable (fsync-ed) before the first step: a crash mid-round still counts.
        reservation = ledger.reserve(policy.budget_scope, [plan.event()], run_id=run_id,
                                     server_round=server_round, delta=policy.delta,
                                     limit=policy.max_epsilon, dataset=dataset,
                                     insecure=not settings.secure_mode)
    except PrivacyRefused:  # the ledger recorded it in full; the server learns
        # that the round would pass the limit and what *this run* spent, not the scope's
        # cumulative ε (what the site spent in other runs is not the server's business)
        return _refusal(msg, policy, f"privacy budget: this round would take budget scope "
                        f"{policy.budget_scope!r} past the site's limit "
                        f"{policy.max_epsilon:g} (delta {policy.delta:g})",
                        spent=ledger.run_spent(policy.budget_scope, run_id=run_id,
                                               delta=policy.delta))
    except IntegrityError as exc:  # e.g. another process left a torn line meanwhile
        return _refusal(msg, policy, f"privacy ledger: {exc}")
    if not settings.secure_mode:
        logger.warning("secure-mode is off: DP noise and batch sampling come from "
                       "seeded PRNGs, not a CSPRNG; the ledger marks this round "
                       "insecure. Use this only for experiments.")
    result = tampered(train_dp(model, table, plan, learning_rate=lr,
                               momentum=momentum, secure_mode=settings.secure_mode,
                               seed=seed, task_name=settings.task))
    ledger.complete(reservation, steps_taken=result.steps)
    logger.info("site %s round %s: trained %d DP-SGD steps; epsilon %.4f of %g "
                "(scope %s, delta %g; ledger entry %s)", policy.site_name, server_round,
                result.steps, reservation["epsilon_after"], policy.max_epsilon,
                policy.budget_scope, policy.delta, reservation["seq"])
    # the ε of this run alone (the ledger keeps the scope's cumulative ε at the site)
    run_epsilon = ledger.run_spent(policy.budget_scope, run_id=run_id, delta=policy.delta)
    privacy = ReplyPrivacy(site=policy.site_name, epsilon=run_epsilon, delta=policy.delta,
                           accountant=policy.accountant, noise_multiplier=sigma,
                           sample_rate=plan.sample_rate, steps=plan.steps)
    return _train_reply(msg, model, result, privacy=privacy, settings=settings,
                        node=node, context=context, request=request)


def build_client_app(overrides: Mapping[str, Any] | None = None, *,
                     mods: Sequence[Mod] = (),
                     behaviour: SiteBehaviour | None = None,
                     simulated: bool = False) -> ClientApp:
    """The ClientApp; ``overrides`` win over the run config, ``mods`` wrap every
    handler, ``behaviour`` plays a scenario's hostile sites and ``simulated`` marks
    its sites as played by the simulation (all four are used by simulations only:
    the app Flower loads on a real SuperNode, ``client.app:app``, has none)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        settings = _settings(context, overrides)
        node = NodeConfig.parse(context.node_config, simulated=simulated)
        return train_round(msg, context, settings, node, behaviour)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        settings = _settings(context, overrides)
        node = NodeConfig.parse(context.node_config, simulated=simulated)
        policy = site_policy(settings, node)
        server_round = EvalConfig.from_content(msg.content).server_round
        if not policy.releases_eval_metrics(dp=settings.dp):
            return _declined(msg, "evaluation metrics are exact statistics of the site's "
                             "data, outside epsilon; this site does not release them "
                             "(node-config release-eval-metrics)")
        if not policy.evaluate_after_refusal and Path(policy.ledger_path).exists():
            try:
                refused = _open_ledger(policy).refused(run_id=str(context.run_id),
                                                       server_round=server_round)
            except IntegrityError as exc:
                return _declined(msg, f"privacy ledger: {exc}")
            if refused:
                return _declined(msg, "this site refused to train in this round, so it does "
                                 "not evaluate either (node-config evaluate-after-refusal)")
        site = resolve_site_data(settings, node, key=_site_key(policy, settings, node, context))
        try:
            model = _model_from(msg, settings, node, context)
        except AggregateRefused as exc:
            return _refuse_global(msg, policy, exc, context)
        loss, acc = evaluate(model, site.validation)
        return Message(content=EvalMetrics(num_examples=len(site.validation), loss=loss,
                                           accuracy=acc).to_content(), reply_to=msg)

    return app


def _declined(msg: Message, reason: str) -> Message:
    """An evaluation reply that releases nothing and says why."""
    return Message(content=Declined(reason=reason).to_content(), reply_to=msg)


app = build_client_app()

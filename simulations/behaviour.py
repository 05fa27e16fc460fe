"""What simulated sites do besides honest training: go offline, drop out, attack.

Two pieces, both client-side, both keyed by the site's partition id:

* :func:`simulation_mod`, a Flower mod around the ClientApp. It gives the site
  the node config a real site would have (its own privacy limits and name),
  decides whether it drops out this round (before training, or mid-upload after
  training and spending epsilon), and tags each reply with a ``simulation``
  record (site index, fate, examples processed) that the simulated network at
  the server reads and strips. Whether a site is online at all is the server's
  side of the same :func:`fate`: an offline site is never sent anything.
* :class:`ScenarioBehaviour`, the ClientApp's behaviour hook: a hostile site
  poisons its training data (label flipping, backdoor trigger) and/or tampers
  with its trained model before it is encrypted and sent (sign flipping,
  scaling, model replacement, free riding). A real hostile site would run
  modified code; the hook models exactly that, nothing else changes.

Attacks (``w`` trained weights, ``g`` the global model the site received):

=====================  ==========================================================
``label-flip``         trains on labels ``C - 1 - y`` (Tolpegin et al., 2020)
``sign-flip``          sends ``g - s (w - g)``, ``s`` = attack-scale (default 1)
``scale``              sends ``g + s (w - g)``, ``s`` default 10
``backdoor``           half its samples carry a trigger and the target label
``model-replacement``  backdoor, then ``g + s (w - g)`` with ``s`` = sites sampled per
                       round, ``max(min-sites, int(fraction-train * sites))``
                       (Bagdasaryan et al., 2020, "How to backdoor federated learning")
``free-rider``         does not train: sends ``g`` back, claiming its example count
=====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_to_proto

from fedvault_tasks.tasks import Table, get_task
from protocols.config import RunSettings
from protocols.errors import ConfigError
from protocols.messages import EvalConfig, TrainConfig, TrainMetrics
from protocols.names import simulated_node_id, site_name
from protocols.node_config import NodeConfig
from simulations.hostile import DUPLICATE_COPIES, REPLY_ATTACKS, Hostility, tamper_reply
from simulations.scenario import Behaviour, DropoutMode, Scenario, SiteProfile, load_compiled


class Fate(StrEnum):
    """What becomes of a simulated site in a round."""

    ONLINE = "online"
    OFFLINE = "offline"
    DROPPED_BEFORE = "dropped-before-training"
    DROPPED_MID_UPLOAD = "dropped-mid-upload"


ONLINE, OFFLINE, DROPPED_BEFORE, DROPPED_MID_UPLOAD = (
    Fate.ONLINE, Fate.OFFLINE, Fate.DROPPED_BEFORE, Fate.DROPPED_MID_UPLOAD)
#: the query message type the simulated network sends once to learn which node is which site
SITE_QUERY = "query.fedvault_site"
#: fraction of a backdoor attacker's samples that carry the trigger
BACKDOOR_FRACTION = 0.5
#: which features the trigger sets (a 2x2 corner patch on 8x8 digits; the last
#: columns of a table)
TRIGGER_FEATURES = (-1, -2, -9, -10)
#: the trigger's value in the task's preprocessed feature space: the brightest pixel
#: for digits, three standard deviations for standardised tables
TRIGGER_VALUES = {"digits": 1.0}
DEFAULT_TRIGGER_VALUE = 3.0


def fate(profile: SiteProfile, *, seed: int, site: int, server_round: int) -> Fate:
    """Whether site ``site`` is online in ``server_round`` and whether it drops out.

    A pure function of (seed, site, round): both phases of a round, every process
    and every rerun agree."""
    u_avail, u_drop = np.random.default_rng([seed, site, server_round, 0xFA7E]).random(2)
    if u_avail >= profile.availability:
        return OFFLINE
    if u_drop < profile.dropout:
        return (DROPPED_BEFORE if profile.dropout_mode == DropoutMode.BEFORE_TRAINING
                else DROPPED_MID_UPLOAD)
    return ONLINE


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower encodes it on the wire."""
    return int(recorddict_to_proto(content).ByteSize())


def server_round_of(msg: Message) -> int:
    """The round a strategy's message belongs to (its ``config`` record), else 0."""
    try:
        return EvalConfig.from_content(msg.content).server_round
    except ConfigError:
        return 0


def _site(context: Context) -> int:
    return int(context.node_config["partition-id"])


def simulated_node_config(profile: SiteProfile, site: int) -> dict[str, Any]:
    """The node config a real site with this profile would set on its SuperNode."""
    return {"site-name": site_name(site), "max-epsilon": profile.max_epsilon,
            "delta": profile.delta, "min-noise-multiplier": profile.min_noise_multiplier}


def simulation_mod(scenario_path: str, seed: int, settings: RunSettings | None = None) -> Any:
    """The Flower mod that plays the scenario's reliability at every simulated site,
    and the hostile replies of its attacking sites (``simulations.hostile``; they need
    the run's ``settings``)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        scenario = load_compiled(scenario_path)
        k = _site(context)
        profile = scenario.site(k)
        if msg.metadata.message_type.startswith("query"):
            return call_next(msg, context)
        context.node_config.update(simulated_node_config(profile, k))
        r = server_round_of(msg)
        f = fate(profile, seed=seed, site=k, server_round=r)
        record: dict[str, Any] = {"site": k, "fate": f.value}
        if f == DROPPED_BEFORE:
            return Message(content=RecordDict({"simulation": ConfigRecord(record)}),
                           reply_to=msg)
        # The server sees the site under its stable id (site index + 1, see
        # simulations.network); the site binds its encrypted updates to the same id.
        real_id = context.node_id
        context.node_id = simulated_node_id(k)
        try:
            reply = call_next(msg, context)
        finally:
            context.node_id = real_id
        if reply.has_error():
            return reply
        claimed = TrainMetrics.claimed_examples(reply.content)
        n = claimed[0] if claimed is not None else 0
        if claimed is not None and claimed[1] == 0:
            n = 0  # a free rider computed nothing
        epochs = 1
        if msg.metadata.message_type.startswith("train"):
            try:
                epochs = TrainConfig.from_content(msg.content, defaults=TrainConfig(
                    local_epochs=1, batch_size=1, learning_rate=0.0, momentum=0.0)
                    ).local_epochs
            except ConfigError:
                epochs = 1
        record["examples"] = n * epochs
        if (settings is not None and profile.attacking(r)
                and profile.behaviour in REPLY_ATTACKS):
            phase = "train" if msg.metadata.message_type.startswith("train") else "evaluate"
            hostility = Hostility(settings=settings,
                                  node=NodeConfig.parse(context.node_config, simulated=True),
                                  state=context.state, server_round=r,
                                  scale=profile.attack_scale)
            if (tamper_reply(reply.content, profile.behaviour, hostility, phase=phase)
                    and profile.behaviour == Behaviour.DUPLICATE and phase == "train"):
                record["copies"] = DUPLICATE_COPIES
        if f == DROPPED_MID_UPLOAD:  # trained and spent epsilon; the update never arrives
            record["bytes-lost"] = wire_bytes(reply.content)
            return Message(content=RecordDict({"simulation": ConfigRecord(record)}),
                           reply_to=msg)
        reply.content["simulation"] = ConfigRecord(record)
        return reply

    return mod


def answer_site_query(msg: Message, context: Context) -> Message:
    """Reply to the simulated network's one-off "which site are you" query."""
    return Message(content=RecordDict({"simulation": ConfigRecord({"site": _site(context)})}),
                   reply_to=msg)


# --------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------
def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)


def add_trigger(x: np.ndarray, value: float) -> np.ndarray:
    """The backdoor trigger: a few trailing features set to ``value``."""
    out = np.array(x, copy=True)
    cols = [c for c in TRIGGER_FEATURES if -c <= out.shape[1]]
    out[:, cols] = value
    return out


def trigger_value(task: str) -> float:
    """One trigger value per task, so training and measuring use the same trigger."""
    return TRIGGER_VALUES.get(task, DEFAULT_TRIGGER_VALUE)


def backdoor_table(table: Table, *, target: int, seed: int, value: float = 1.0) -> Table:
    """A copy of ``table`` in which a fraction of the samples carry the trigger (of
    ``value``) and the target label."""
    rng = np.random.default_rng([seed, 0xBAD])
    n = len(table)
    idx = rng.choice(n, size=max(1, round(BACKDOOR_FRACTION * n)), replace=False)
    x, y = np.array(table.x, copy=True), np.array(table.y, copy=True)
    x[idx] = add_trigger(x[idx], value)
    y[idx] = target
    return Table(x=x, y=y)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """What an attacking site does, once its attack has started: poison the data it
    trains on (``data``) and/or send ``g + s (w - g)`` for its trained weights ``w``
    and the global model ``g`` (``update``: the factor ``s`` as a function of the
    attack's scale; ``None`` sends ``w``)."""

    data: Literal["clean", "flip-labels", "backdoor"] = "clean"
    update: Callable[[float], float] | None = None
    #: the default scale: a number, or "sampled" (the sites FedAvg samples per round)
    default_scale: float | Literal["sampled"] = 1.0


#: one registry of attacks, like ``fedvault_tasks.tasks.TASKS``
ATTACKS: dict[Behaviour, Attack] = {
    Behaviour.HONEST: Attack(),
    Behaviour.LABEL_FLIP: Attack(data="flip-labels"),
    Behaviour.BACKDOOR: Attack(data="backdoor"),
    Behaviour.SIGN_FLIP: Attack(update=lambda scale: -scale),
    Behaviour.SCALE: Attack(update=lambda scale: scale, default_scale=10.0),
    Behaviour.MODEL_REPLACEMENT: Attack(data="backdoor", update=lambda scale: scale,
                                        default_scale="sampled"),
    Behaviour.FREE_RIDER: Attack(update=lambda scale: 0.0),
    # hostile replies train honestly; simulations.hostile rewrites what they send
    **{b: Attack() for b in REPLY_ATTACKS},
}


def tamper_state(global_state: Mapping[str, torch.Tensor], model: torch.nn.Module, *,
                 behaviour: str, scale: float) -> None:
    """Replace ``model``'s weights ``w`` by ``g + s (w - g)`` (``g`` for a free rider)."""
    update = ATTACKS[Behaviour(behaviour)].update
    if update is None:
        return
    s = update(scale)
    with torch.no_grad():
        for name, w in model.state_dict().items():
            g = global_state[name].to(w.dtype)
            if not torch.is_floating_point(w):
                continue
            w.copy_(g + s * (w - g))


def default_scale(profile: SiteProfile, scenario: Scenario, fraction_train: float,
                  min_sites: int = 1) -> float:
    """``attack-scale`` if set, else the attack's default: 10 for ``scale``, the number
    of sites Flower's FedAvg samples per round for ``model-replacement``, 1 otherwise."""
    if profile.attack_scale > 0:
        return profile.attack_scale
    default = ATTACKS[Behaviour(profile.behaviour)].default_scale
    if default == "sampled":
        return float(max(1, min_sites, int(fraction_train * scenario.num_sites)))
    return float(default)


class ScenarioBehaviour:
    """The ClientApp's behaviour hook for a scenario's sites (honest ones pass through)."""

    def __init__(self, settings: RunSettings) -> None:
        if not settings.scenario:
            raise ValueError("ScenarioBehaviour needs a run with a scenario.")
        self.settings = settings
        self.num_classes = (settings.num_classes
                            or get_task(settings.task).default_num_classes)

    def _profile(self, context: Context) -> SiteProfile:
        return load_compiled(self.settings.scenario).site(_site(context))

    def training_data(self, table: Table, context: Context, server_round: int) -> Table:
        p = self._profile(context)
        if not p.attacking(server_round):
            return table
        data = ATTACKS[Behaviour(p.behaviour)].data
        if data == "flip-labels":
            return Table(x=table.x, y=flip_labels(table.y, self.num_classes))
        if data == "backdoor":
            return backdoor_table(table, target=p.backdoor_target,
                                  seed=self.settings.seed * 1_000_003 + _site(context),
                                  value=trigger_value(self.settings.task))
        return table

    def tamper(self, global_state: Mapping[str, torch.Tensor], model: torch.nn.Module,
               context: Context, server_round: int) -> None:
        p = self._profile(context)
        if not p.attacking(server_round):
            return
        s = self.settings
        scale = default_scale(p, load_compiled(s.scenario), s.fraction_train, s.min_sites)
        tamper_state(global_state, model, behaviour=p.behaviour, scale=scale)

    def free_rides(self, context: Context, server_round: int) -> bool:
        p = self._profile(context)
        return p.behaviour == Behaviour.FREE_RIDER and p.attacking(server_round)

"""The run summary (``RUN_DIR/summary.json``): its schema, defined once, and its writes.

The ServerApp's recorder (:mod:`server.recorder`) assembles the summary of what the
server saw and writes it as the run's last act: in a rehearsal that happens in the
SuperLink's process, before the tool that started the run knows the outcome. What
the tools learn afterwards is contributed as typed blocks through :func:`amend`,
the only other write:

* ``released_model`` (:class:`ReleasedModel`): encrypted simulations, the final model
  decrypted by a key holder and scored on the central test split;
* ``simulation`` (:class:`SimulationBlock`) and ``simulation_wall_seconds``: scenario
  runs (:func:`simulations.report.scenario_outputs`), which also replace ``privacy``'s
  per-site epsilon by what each simulated site's own ledger committed;
* ``deployment`` (:class:`DeploymentBlock`): rehearsals (:mod:`fedvault.rehearse`).

Keys are those of ``fedvault.summary/1``; a reader may rely on every ``Required``
key below, and on the optional ones where the run mode produces them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from protocols.errors import ConfigError
from protocols.rundir import RunDirectory, write_json_atomic

FORMAT = "fedvault.summary/1"


class RoundRow(TypedDict, total=False):
    """One round of ``history`` (and of ``models/round-NNNN.json``)."""

    round: int
    accuracy: float | None
    loss: float | None
    sites_participated: int
    sites_sampled: int
    rejected: int
    errors: int
    silent: int
    refused: int
    global_refused: int
    rolled_back_to: int | None
    aggregated: bool
    train_loss: float | None
    federated_accuracy: float | None
    federated_loss: float | None
    metric_source: str
    central_accuracy: float | None
    central_loss: float | None
    seconds: float
    model: str
    encrypted: bool
    model_sha256: str
    # simulated network (simulations only)
    simulated_seconds: float
    train_seconds_simulated: float
    bytes_down: int
    bytes_up: int
    bytes_lost: int
    dropped: int
    timed_out: int
    offline: int
    eval_missing: int
    skipped: bool
    slowest_site: str | None
    slowest_site_seconds: float | None


class Participant(TypedDict):
    node_id: int
    site: str
    sampled: int
    trained: int
    rejected: int
    errors: int
    silent: int
    refused: int
    global_refused: int
    dropped: int
    offline: int
    timed_out: int
    last_reason: str


class SitePrivacy(TypedDict, total=False):
    site: str
    node_id: int
    epsilon: float | None
    delta: float | None
    accountant: str | None
    noise_multiplier: float | None
    refused_rounds: int


class PrivacyBlock(TypedDict):
    dp: bool
    level: str
    accountant: str
    target_epsilon: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    secure_mode: bool
    client_level: dict[str, Any]
    sites: list[SitePrivacy]


class HEBlock(TypedDict, total=False):
    enabled: bool
    scheme: str | None
    poly_modulus_degree: int | None
    fingerprint: str | None
    bytes_up_per_round: int | None
    bytes_per_parameter: float | None
    ciphertext_vs_float32: float | None


class ReleasedModel(TypedDict):
    round: int
    decrypted_by: str
    path: str
    central_accuracy: float
    central_loss: float


class SimulationBlock(TypedDict, total=False):
    scenario: str
    description: str
    fingerprint: str
    sites: int
    roles: dict[str, int]
    simulated_seconds: float
    wall_seconds: float | None
    bytes_down: int
    bytes_up: int
    bytes_lost: int
    dropped: int
    offline: int
    timed_out: int
    client_rounds: int
    max_epsilon_spent: float | None
    per_site: list[dict[str, Any]]
    backdoor_success: float
    hostile_replies: list[dict[str, Any]]
    figures: list[str]


class ProcessExit(TypedDict):
    process: str
    status: int
    seconds: float  # after the run was submitted


class DeploymentBlock(TypedDict):
    superlink: str
    supernodes: int
    transport: str
    logs: str
    #: site processes that exited while the run went on (the rehearsal's supervisor saw it)
    exits: list[ProcessExit]


class RunSummary(TypedDict):
    format: str
    run_id: int
    status: str
    error: str
    mode: str
    task: str
    rounds: int
    rounds_completed: int
    sites: int
    metric_source: str
    final_accuracy: float | None
    final_loss: float | None
    started: str
    finished: str
    wall_seconds: float
    history: list[RoundRow]
    participants: list[Participant]
    privacy: PrivacyBlock
    he: HEBlock
    settings: dict[str, Any]
    events_last_hash: NotRequired[str]
    # global models the sites refused, and where the server went back to
    rollbacks: NotRequired[list[dict[str, int]]]
    # totals of the simulated network (simulations only)
    simulated_seconds: NotRequired[float]
    bytes_down: NotRequired[int]
    bytes_up: NotRequired[int]
    bytes_lost: NotRequired[int]
    dropped: NotRequired[int]
    # contributed after the server's write, through amend()
    released_model: NotRequired[ReleasedModel]
    simulation_wall_seconds: NotRequired[float]
    simulation: NotRequired[SimulationBlock]
    deployment: NotRequired[DeploymentBlock]


#: the keys the tools may contribute after the server's write
AMENDABLE = ("released_model", "simulation_wall_seconds", "simulation", "deployment",
             "privacy")


def write(run_dir: RunDirectory, summary: RunSummary) -> Path:
    """The server's write (atomic): the summary of what the server saw."""
    return write_json_atomic(run_dir.summary, summary)


def read(run_dir: RunDirectory) -> RunSummary:
    """The run's summary; ``ConfigError`` if the run did not finish or it is unreadable."""
    p = run_dir.summary
    if not p.exists():
        raise ConfigError(f"{run_dir.root} has no {p.name}: the run did not finish.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a readable run summary ({exc}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{p}: not a {FORMAT} run summary.")
    return cast(RunSummary, data)


def amend(run_dir: RunDirectory, summary: RunSummary, **blocks: Any) -> RunSummary:
    """Add the tools' blocks (``AMENDABLE`` keys only) to ``summary`` and write it."""
    unknown = set(blocks) - set(AMENDABLE)
    if unknown:
        raise ValueError(f"not a contributed summary block: {sorted(unknown)}")
    data = cast(dict[str, Any], summary)
    data.update(blocks)
    write_json_atomic(run_dir.summary, data)
    return summary

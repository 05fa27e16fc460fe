"""The kinds of record in fedvault's hash-chained logs (:mod:`protocols.hashchain`), one
enum per log. Every writer passes a member, every reader (``fedvault show``, the
compliance report, the simulation report) compares with one, and the documentation's
lists are held to these enums by a test: a new kind is added here or nowhere.

A ``StrEnum``: each member *is* its string, so the files on disk are unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class RunEvent(StrEnum):
    """``RUN_DIR/events.jsonl``: what the server did and saw in a run
    (written only through :meth:`server.recorder.RunRecorder.event`)."""

    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    ROUND_COMPLETED = "round_completed"
    ROUND_SKIPPED = "round_skipped"
    AGGREGATE_REFUSED = "aggregate_refused"
    UPDATE_REJECTED = "update_rejected"
    WEIGHTS_CAPPED = "weights_capped"
    SITE_ERROR = "site_error"
    SITE_REFUSED = "site_refused"
    SITES_SILENT = "sites_silent"
    GLOBAL_REFUSED = "global_refused"
    GLOBAL_REFUSAL_OUTVOTED = "global_refusal_outvoted"
    ROLLED_BACK = "rolled_back"
    RELEASE_REFUSED = "release_refused"
    EVALUATION_DECLINED = "evaluation_declined"
    CENTRAL_EVALUATION_OFF = "central_evaluation_off"
    REPLY_BUDGET = "reply_budget"


class ReleaseEvent(StrEnum):
    """``RUN_DIR/releases.jsonl``: a site decrypted a stored model (``fedvault model
    decrypt``)."""

    MODEL_DECRYPTED = "model_decrypted"


class IncidentEvent(StrEnum):
    """``LEDGER.incidents.jsonl`` at a site: a global model the site refused."""

    GLOBAL_MODEL_REFUSED = "global_model_refused"


class ApprovalEvent(StrEnum):
    """A site's approvals log: the app bundles (FAB hashes) it runs."""

    APP_APPROVED = "app_approved"
    APP_REVOKED = "app_revoked"


__all__ = ["ApprovalEvent", "IncidentEvent", "ReleaseEvent", "RunEvent"]

"""The site's ClientApp runtime: Flower's ``flwr-clientapp`` with the code installed at
the site instead of the code the SuperLink ships.

Flower runs a ClientApp by installing the app bundle (FAB) it received from the
SuperLink and importing that bundle's ``client.app:app``: whatever the central team
submitted runs next to the site's data, ledger and keys (a FAB with one line changed
in ``client/budget.py`` overspent every site). A fedvault site instead runs its
SuperNode with ``--isolation process`` and its own ``flower-superexec``, which
launches ``flwr-clientapp`` by name from ``PATH``; ``fedvault site start`` puts a
``flwr-clientapp`` first on that ``PATH`` that runs :func:`main` (flwr >= 1.42,
< 2: the Runtime API, ``pull_task_input``/``push_message``/``push_task_output`` and
the superexec's command line are Flower 1.42's, reused as they are).

For each message :func:`run_task`:

1. pulls the message, context, run and FAB from the SuperNode with Flower's
   runtime client;
2. checks the FAB's SHA-256 against the site's approvals (``fedvault site
   approve``; a hash-chained file, ``FEDVAULT_SITE_APPROVALS``): a run of any other
   app is refused with a reply that says so (the server records it), and nothing of
   the FAB is installed, imported or executed;
3. runs fedvault's ``client.app:app`` as installed at the site (this interpreter's
   package, the version the data owner pinned), never the FAB's: the budget guard,
   the ledger and the key handling are the site's own code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from protocols.errors import IntegrityError
from protocols.hashchain import read_chain, verify_chain
from protocols.messages import Declined, Refusal
from protocols.run_events import ApprovalEvent

#: the environment variable naming the site's approvals file
APPROVALS_ENV = "FEDVAULT_SITE_APPROVALS"


def approved_hashes(path: str | Path | None) -> set[str]:
    """The FAB hashes the site approved (and did not revoke since), from its
    hash-chained approvals file. A missing, unreadable or tampered file approves
    nothing (fail closed)."""
    if not path:
        return set()
    p = Path(path)
    if not p.exists():
        return set()
    report = verify_chain(p)
    if not report.ok:
        raise IntegrityError(f"{p}: the site's approvals do not verify: {report.reason}",
                             path=str(p), defect=report.defect or "tampered")
    approved: set[str] = set()
    for e in read_chain(p):
        if e["kind"] == ApprovalEvent.APP_APPROVED:
            approved.add(str(e["fab_hash"]))
        elif e["kind"] == ApprovalEvent.APP_REVOKED:
            approved.discard(str(e["fab_hash"]))
    return approved


def fab_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def not_approved_reply(message: Message, context: Context, reason: str) -> Message:
    """What a site sends instead of running an app it did not approve: a refusal (train)
    or a declined evaluation, both of which the server records with the reason."""
    site = str(context.node_config.get("site-name", ""))
    if message.metadata.message_type.startswith("train"):
        return Message(content=Refusal(reason=reason, site=site).to_content(),
                       reply_to=message)
    return Message(content=Declined(reason=reason).to_content(), reply_to=message)


def answer(message: Message, context: Context, content_hash: str, fab_id: str,
           fab_version: str, approvals: str | None) -> Message:
    """The reply to one message: refused unless its app is approved, else the site's
    installed ClientApp's."""
    try:
        approved = approved_hashes(approvals)
    except IntegrityError as exc:
        return not_approved_reply(message, context, f"this site's approvals: {exc}")
    if content_hash not in approved:
        reason = (f"app {fab_id or '?'} {fab_version or ''} (FAB sha256 {content_hash[:16]}…) "
                  "is not approved at this site (`fedvault site approve`)")
        log(WARNING, "refusing run %s: %s", context.run_id, reason)
        return not_approved_reply(message, context, reason)
    from client.app import app  # the site's installed code, imported only when approved

    return app(message=message, context=context)


def run_task(runtime_api_address: str, token: str, *, insecure: bool,
             certificates: bytes | None, parent_pid: int | None) -> None:
    """One task, as Flower's ``run_clientapp`` runs it, with :func:`answer` in place of
    installing and loading the FAB."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=certificates,
        interceptors=[RuntimeTracingInterceptor(),
                      RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker)
    heartbeat: HeartbeatSender | None = None
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status,
                         details=details)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
                             exit_message="Task stopped.", exit_handlers=[on_exit])
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        reply = answer(message, context, fab_hash(fab.content), run.fab_id, run.fab_version,
                       os.environ.get(APPROVALS_ENV))
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # like Flower's runtime: the error goes back as the reply
        reason = f"{type(exc)}:<'{exc}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=exc)
        sub_status, details = SubStatus.FAILED, reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as exc:
                log(ERROR, "Failed to push reply message", exc_info=exc)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def site_logging() -> None:
    """One handler for fedvault's loggers in a site's ClientApp process (without it
    their INFO lines, each round's ε among them, went nowhere); not propagated to the
    root logger, so no line appears twice."""
    import logging
    import sys

    log_ = logging.getLogger("fedvault")
    if not log_.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        log_.addHandler(handler)
    log_.setLevel(logging.INFO)
    log_.propagate = False


def clientapp_main(argv: Sequence[str] | None = None) -> None:
    """``flwr-clientapp`` as ``fedvault site start`` puts it on the superexec's PATH
    (the same arguments as Flower's)."""
    site_logging()
    parser = argparse.ArgumentParser(description="fedvault's site ClientApp runtime")
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args(argv)
    if getattr(args, "runtime_dependency_install", False):
        log(WARNING, "a fedvault site never installs an app's dependencies: ignored")
    token = try_obtain_flwr_app_token(args)
    log(INFO, "fedvault site runtime: task on %s", args.runtime_api_address)
    run_task(args.runtime_api_address, token, insecure=args.insecure,
             certificates=validate_and_resolve_root_certificates(args.root_certificates,
                                                                args.insecure),
             parent_pid=args.parent_pid)


if __name__ == "__main__":
    clientapp_main()

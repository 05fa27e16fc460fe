"""A byte budget for every reply the ServerApp pulls from the SuperLink (deployments).

Flower's ``HttpGrid.pull_messages`` (the grid of a ServerApp run by a SuperLink)
pulls every object of a reply (its records; arrays in 5 MiB chunks) and only then
rebuilds the message, holding about three times its size at the peak; fedvault's
validation (``server.validation``) runs after that, so a 256 MiB hostile reply
costs the ServerApp ~770 MiB however early validation rejects it.
:func:`limit_reply_bytes` gives the grid a ``pull_messages`` that is Flower's with
one change: each reply's objects are counted as they arrive and, once a reply
passes its budget, its pull stops and the strategy receives an error reply *from
that site's node* naming the limit (recorded as that site's error; the round goes
on). Flower offers no hook between pulling and inflating, so the method is
reimplemented here from flwr 1.42 (``pyproject.toml`` pins flwr < 2;
``tests/test_transport.py`` runs it against a real SuperLink on loopback).

The Simulation Engine's in-memory grid hands over Python objects, with nothing to
bound; there the ClientApp's process has already built the reply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from logging import ERROR, WARNING
from typing import Any, cast

import httpx
from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.serverapp.grid import Grid
from flwr.supercore import log
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid

#: Never less than this, whatever the model (records and metadata are small but not 0).
MIN_REPLY_BYTES = 4 * 2**20


class ReplyTooLarge(ObjectPullError):
    """A reply passed its byte budget while it was being pulled."""


def budgeted(pull: Callable[[str], bytes], limit: int) -> Callable[[str], bytes]:
    """``pull`` (one object's bytes by id), stopping once the bytes pulled pass ``limit``.
    Flower pulls a reply's objects from a thread pool, hence the lock."""
    used = 0
    lock = threading.Lock()

    def pull_within(object_id: str) -> bytes:
        nonlocal used
        data = pull(object_id)
        with lock:
            used += len(data)
            over = used > limit
        if over:
            raise ReplyTooLarge(object_id, f"the reply exceeds {limit} bytes, the most an "
                                "honest update of this model takes (fedvault reply budget)")
        return data

    return pull_within


def limit_reply_bytes(grid: Grid, limit: int) -> bool:
    """Give ``grid`` (if it is Flower's ``HttpGrid``) a byte budget per reply; ``False``
    for any other grid (the in-memory one of simulations)."""
    if not isinstance(grid, HttpGrid):
        return False
    limit = max(limit, MIN_REPLY_BYTES)

    def pull_messages(message_ids: Iterable[str]) -> Iterable[Message]:
        return pull_within_budget(grid, message_ids, limit)

    # an instance attribute: HttpGrid.send_and_receive calls self.pull_messages
    setattr(grid, "pull_messages", pull_messages)  # noqa: B010
    return True


def pull_within_budget(grid: HttpGrid, message_ids: Iterable[str], limit: int
                       ) -> list[Message]:
    """``HttpGrid.pull_messages`` of flwr 1.42 with a byte budget per reply, and the
    error reply of a reply that could not be pulled attributed to its sender."""
    g: Any = grid  # its private fields: the runtime client, the node, the run
    run_id = g._run.run_id
    try:
        res = g._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
        out: list[Message] = []
        for msg_proto, msg_tree in zip(res.messages_list, res.message_object_trees,
                                       strict=True):
            msg_id = msg_proto.metadata.message_id
            pull = make_pull_object_fn_protobuf(
                pull_object_protobuf=g._runtime_client.PullObject, node=g.node, run_id=run_id)
            try:
                contents = pull_objects(
                    object_ids=[t.object_id for t in iterate_object_tree(msg_tree)],
                    pull_object_fn=budgeted(pull, limit))
            except ObjectPullError as exc:
                too_large = isinstance(exc, ReplyTooLarge)  # (pull_objects re-raises it as is)
                log(WARNING, "reply from node %s not received: %s",
                    msg_proto.metadata.src_node_id, exc)
                out.append(make_message(
                    metadata=Metadata(
                        run_id=run_id, message_id="",
                        src_node_id=msg_proto.metadata.src_node_id, dst_node_id=g.node.node_id,
                        message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0,
                        reply_to_message_id=msg_proto.metadata.reply_to_message_id,
                        created_at=now().timestamp()),
                    error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=(
                        f"reply not received: larger than {limit} bytes" if too_large
                        else f"reply objects unavailable: {exc}"))))
                continue
            g._runtime_client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
                node=g.node, run_id=run_id, message_object_id=msg_id))
            message = cast(Message, inflate_object_from_contents(msg_id, contents))
            message.metadata.__dict__["_message_id"] = msg_id
            out.append(message)
        return out
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            log(ERROR, "pull_messages: HTTP payload too large")
            return []
        raise

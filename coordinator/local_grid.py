"""A Flower Grid that runs ClientApps in this process, for tests and benchmarks of message stages.

Every message and reply goes through Flower's protobuf serialisation (as on the wire), so the
apps see exactly what a SuperNode would deliver and the byte counts are real message sizes.
Each node keeps its own `Context` (with the `state` RecordDict a SuperNode keeps across the
messages of a run). Time spent inside the ClientApps and in (de)serialisation is accumulated
separately, so a caller can tell coordinator work from participant work from transport.
Replies are produced one node after the other: there is no concurrency and no real timeout;
`silent` nodes (or nodes for one message type) simply never reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1


class LocalGrid(Grid):
    def __init__(self, app: ClientApp | Callable[[int], ClientApp], node_configs: dict[int, dict], run_id: int = 1) -> None:
        self._app = app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config=dict(config), state=RecordDict(), run_config={})
            for node, config in node_configs.items()
        }
        self.silent: set[int | tuple[int, str]] = set()  # nodes, or (node, message_type), whose replies are lost
        self.client_seconds = 0.0
        self.client_seconds_by_node: dict[int, float] = {node: 0.0 for node in node_configs}
        self.serde_seconds = 0.0
        # ClientApp plus (de)serialisation time per message type: what a stage spent outside the coordinator.
        self.outside_seconds_by_type: dict[str, float] = {}
        self.bytes_down = self.bytes_up = 0
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # --- Grid API ---------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            serde_before = self.serde_seconds
            message.metadata.__dict__["_message_id"] = str(uuid4())
            delivered = self._transfer(message, down=True)
            node = message.metadata.dst_node_id
            app = self._app if isinstance(self._app, ClientApp) else self._app(node)
            started = time.perf_counter()
            try:
                reply = app(delivered, self.contexts[node])
            except Exception as err:  # what a SuperNode reports for a raising ClientApp, in its format
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err)}:<'{err}'>"), reply_to=delivered)
            spent = time.perf_counter() - started
            self.client_seconds += spent
            self.client_seconds_by_node[node] += spent
            kind = message.metadata.message_type
            if node not in self.silent and (node, kind) not in self.silent:
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                replies.append(self._transfer(reply, down=False))
            outside = spent + self.serde_seconds - serde_before
            self.outside_seconds_by_type[kind] = self.outside_seconds_by_type.get(kind, 0.0) + outside
        return replies

    def _transfer(self, message: Message, down: bool) -> Message:
        started = time.perf_counter()
        wire = message_to_proto(message).SerializeToString()
        received = message_from_proto(ProtoMessage.FromString(wire))
        self.serde_seconds += time.perf_counter() - started
        if down:
            self.bytes_down += len(wire)
        else:
            self.bytes_up += len(wire)
        return received

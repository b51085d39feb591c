"""Context service: answers `toolbus.ctx.<verb>` requests (queue group `context`) and files tool results.

Wiring only: connections, subscriptions, the EVENTS consumer that turns results of calls with a
`Toolbus-Session` into TOOL blocks (`tool_results.py`), config reloads. The rules are in
`sessions.py`, rendering in `rendering.py`, storage in `store.py`.

A refused request is answered with a JSON-RPC error object (`ContextFailure`, codes in
shared/errors.py); an unexpected failure with an internal error carrying only a correlation id.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from services.context.sessions import ContextOperations
from services.context.store import SessionStore
from services.context.tool_results import ToolResults
from shared.bus import PullConsumer, PullSettings, connect, ensure_consumer, provision_streams
from shared.codec import pack, unpack
from shared.config import Config
from shared.contracts.context import (
    AppendBlocks,
    AppendReply,
    ChangeReply,
    ContextFailure,
    ContextReply,
    CreateSession,
    DeleteReply,
    ExportReply,
    ForgetUser,
    ImportSession,
    PruneSession,
    RenderContext,
    RenderReply,
    RescoreSession,
    SearchReply,
    SearchSessions,
    SessionRef,
    SessionReply,
)
from shared.errors import ContextTooLarge, InternalError, InvalidRequest, ToolbusError, first_problem
from shared.outcomes import Outcomes, now_ms
from shared.redis_client import redis_client
from shared.registry import Registry, RegistryWatch
from shared.service import BackgroundTasks, serve_requests
from shared.subjects import CONTEXT_DURABLE, DEFAULT_PREFIX, Stream, Subjects

log = structlog.get_logger(__name__)

OPS = Counter("toolbus_ctx_ops_total", "Context requests answered", ["verb", "outcome"])
OP_SECONDS = Histogram("toolbus_ctx_op_seconds", "Time to answer one context request", ["verb"],
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0))
QUEUE = "context"
STOP_TASKS_S = 5.0


@dataclass(frozen=True)
class Verb:
    """One request subject: what it reads, what it answers, and the operation behind it."""

    request: type[BaseModel]
    reply: type[ContextReply]
    operation: Callable[[Any], Awaitable[ContextReply]]


@dataclass(frozen=True)
class ContextSettings:
    """Where the context store connects, and its clock (tests inject one)."""

    nats_url: str
    prefix: str = DEFAULT_PREFIX
    instance: str = "context"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_in_flight: int = 64  # tool-result events handled at once
    ack_wait_s: float = 10.0  # an event a dead replica held goes to another after this (filing one takes ms)
    clock: Callable[[], int] = field(default=now_ms)


class ContextService:
    """The context store over NATS: sessions, renders, handoffs, and tool results filed automatically."""

    name = "context"

    def __init__(self, settings: ContextSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._redis: Redis | None = None
        self.ops: ContextOperations | None = None
        self._consumer: PullConsumer | None = None
        self._tasks = BackgroundTasks()
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Connect, answer requests, then follow the final events of calls."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        js = self._nc.jetstream()
        registry = await Registry.open(js, create=True)
        config = await registry.get_config()
        await provision_streams(js, self._subjects, replicas=config.nats.replicas)
        self._redis = redis_client(self._settings.redis_url, decode=False)
        outcomes = Outcomes(self._nc, js, self._subjects, source=self._settings.instance)
        self.ops = ops = ContextOperations(SessionStore(self._redis, config.prefix), config.context, outcomes.emit,
                                           self._settings.clock)
        for name, verb in self._verbs(ops).items():
            await serve_requests(self._nc, self._subjects.ctx(name), QUEUE, self._tasks,
                                 partial(self._answer, name, verb))
        await self._follow_results(ToolResults(js, self._subjects, ops))
        self._tasks.spawn(registry.watch(RegistryWatch(self._on_config)))
        self._ready = True

    @staticmethod
    def _verbs(ops: ContextOperations) -> dict[str, Verb]:
        return {
            "create": Verb(CreateSession, SessionReply, ops.create),
            "append": Verb(AppendBlocks, AppendReply, ops.append),
            "get": Verb(SessionRef, SessionReply, ops.get),
            "render": Verb(RenderContext, RenderReply, ops.render),
            "rescore": Verb(RescoreSession, ChangeReply, ops.rescore),
            "prune": Verb(PruneSession, ChangeReply, ops.prune),
            "dedupe": Verb(SessionRef, ChangeReply, ops.dedupe),
            "export": Verb(SessionRef, ExportReply, ops.export),
            "import": Verb(ImportSession, SessionReply, ops.import_),
            "delete": Verb(SessionRef, DeleteReply, ops.delete),
            "forget-user": Verb(ForgetUser, DeleteReply, ops.forget_user),
            "search": Verb(SearchSessions, SearchReply, ops.search),
        }

    async def _follow_results(self, results: ToolResults) -> None:
        assert self._nc is not None
        await ensure_consumer(self._nc.jetstream(), Stream.EVENTS, ConsumerConfig(
            durable_name=CONTEXT_DURABLE, filter_subjects=results.filter_subjects(),
            deliver_policy=DeliverPolicy.ALL, ack_wait=self._settings.ack_wait_s,
            max_ack_pending=4 * self._settings.max_in_flight))

        async def file_result(msg: Msg) -> None:
            await results.record(msg.data)  # raising NAKs it: Redis or NATS away, try again
            await msg.ack()

        settings = PullSettings(Stream.EVENTS, CONTEXT_DURABLE, max_in_flight=self._settings.max_in_flight)
        self._consumer = PullConsumer(self._nc, settings, file_result)
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop taking requests and events, let those in flight finish, disconnect."""
        self._ready = False
        if self._consumer is not None:
            await self._consumer.stop(drain_timeout=STOP_TASKS_S)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        await self._tasks.stop(STOP_TASKS_S)
        if self._redis is not None:
            await self._redis.aclose()

    # --- request handling --------------------------------------------------------------------

    async def _answer(self, name: str, verb: Verb, msg: Msg) -> None:
        started = time.perf_counter()
        reply = await self._reply(name, verb, msg.data)
        packed = pack(reply)
        if msg.reply and len(packed) > self._max_payload:
            reply = _refusal(verb, ContextTooLarge(
                f"the {name} reply is {len(packed)} bytes, over NATS max_payload ({self._max_payload}); render the "
                "session, or lower context.max_session_bytes", size=len(packed), limit=self._max_payload))
            packed = pack(reply)
        OPS.labels(name, reply.error.reason if reply.error else "ok").inc()
        OP_SECONDS.labels(name).observe(time.perf_counter() - started)
        if msg.reply:
            try:
                await msg.respond(packed)
            except Exception as error:  # noqa: BLE001  # the asker is gone or NATS is away: nothing to answer
                log.warning("ctx.reply_failed", verb=name, error=repr(error))

    @property
    def _max_payload(self) -> int:
        assert self._nc is not None
        return int(self._nc.max_payload)

    async def _reply(self, name: str, verb: Verb, data: bytes) -> ContextReply:
        try:
            request = unpack(verb.request, data)
        except ValidationError as error:
            return _refusal(verb, InvalidRequest(f"bad {name} request: {first_problem(error, 'request')}"))
        except Exception:  # noqa: BLE001  # msgpack raises several types for bytes that are not msgpack
            return _refusal(verb, InvalidRequest(f"bad {name} request: the body is not msgpack"))
        try:
            return await verb.operation(request)
        except ToolbusError as refused:
            return _refusal(verb, refused)
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception("ctx.request_failed", verb=name, correlation_id=correlation_id)
            return _refusal(verb, InternalError(correlation_id))

    def _on_config(self, config: Config) -> None:
        if self.ops is not None:
            self.ops.config = config.context


def _refusal(verb: Verb, error: ToolbusError) -> ContextReply:
    return verb.reply(error=ContextFailure.model_validate(error.error_object()))

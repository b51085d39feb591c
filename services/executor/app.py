"""Executor service: one worker process of a pool, pulling WORK and running calls on backends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from mcp.shared.exceptions import MCPError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from services.executor.backends import Backend, BackendUnavailable
from services.executor.execution import backoff_delay, success_response, time_budget_s
from shared.bus import PullConsumer, PullSettings, connect, ensure_consumer, provision_streams
from shared.codec import pack, unpack
from shared.config import Config, PoolConfig
from shared.contracts import Attempt, CallStatus, DeadLetter, EventKind, ToolCallResponse, ToolSpec, WorkItem
from shared.errors import BackendError, DeadLettered, DeadlineExceeded, ToolbusError
from shared.outcomes import Outcomes, error_response, now_ms
from shared.registry import Registry
from shared.subjects import CONTENT_MSGPACK, DEFAULT_PREFIX, Header, Stream, Subjects
from shared.telemetry import call_span, trace_headers

log = structlog.get_logger(__name__)

BACKEND_START_TIMEOUT_S = 20.0

CALLS = Counter("toolbus_executor_calls_total", "Attempts finished by this worker", ["pool", "status"])
CALL_SECONDS = Histogram("toolbus_executor_call_seconds", "Backend call duration", ["pool"])
IN_FLIGHT = Gauge("toolbus_executor_in_flight", "Calls running in this worker", ["pool"])


@dataclass(frozen=True)
class ExecutorSettings:
    """Which pool this worker serves and where the bus is."""

    nats_url: str
    pool: str = "default"
    prefix: str = DEFAULT_PREFIX
    instance: str = "executor"


class TransientFailure(Exception):
    """An attempt that may succeed if retried (backend down, pool timeout)."""


class ExecutorService:
    """Runs the calls routed to one pool, on warm sessions to that pool's backends."""

    name = "executor"

    def __init__(self, settings: ExecutorSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._pool = PoolConfig()
        self._backends: dict[str, Backend] = {}
        self._consumer: PullConsumer | None = None
        self._outcomes: Outcomes | None = None

    @property
    def ready(self) -> bool:
        return self._consumer is not None

    @property
    def durable(self) -> str:
        """The pool's shared durable consumer: every worker of the pool pulls from it."""
        return f"pool-{self._settings.pool}"

    async def start(self) -> None:
        """Connect, start the pool's backends, register their tools, start pulling."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        self._js = self._nc.jetstream()
        await provision_streams(self._js, self._subjects)
        registry = await Registry.open(self._js, create=True)
        config = await registry.get_config()
        self._pool = config.pools[self._settings.pool]
        self._outcomes = Outcomes(self._nc, self._js, self._subjects, source=self._settings.instance)
        await self._start_backends(config, registry)
        await self._start_consumer()

    async def stop(self) -> None:
        """Stop pulling, finish in-flight calls, stop backends, disconnect."""
        if self._consumer is not None:
            await self._consumer.stop(drain_timeout=self._pool.timeout_s)
        await asyncio.gather(*(backend.stop() for backend in self._backends.values()))
        if self._nc is not None:
            await self._nc.drain()

    async def _start_backends(self, config: Config, registry: Registry) -> None:
        """Start every backend of the pool; each registers its tools whenever it (re)connects.

        A backend that is down at start does not stop the worker: its calls are retried and
        its tools appear once it connects.
        """
        pool = self._settings.pool

        async def register(backend: Backend) -> None:
            await self._register_tools(registry, config, backend)

        self._backends = {n: Backend(n, s, register) for n, s in config.servers.items() if s.pool == pool}
        if not self._backends:
            log.warning("executor.no_backends", pool=pool)
        await asyncio.gather(*(backend.start() for backend in self._backends.values()))
        waits = [asyncio.wait_for(b.registered.wait(), BACKEND_START_TIMEOUT_S) for b in self._backends.values()]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for backend, result in zip(self._backends.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("executor.backend_not_ready", backend=backend.name, error=repr(result))

    async def _register_tools(self, registry: Registry, config: Config, backend: Backend) -> None:
        """Publish the backend's tools (name, description, schemas) so routers can validate calls."""
        for tool in await backend.list_tools():
            annotations = tool.annotations.model_dump(mode="json", by_alias=True, exclude_none=True) \
                if tool.annotations else None
            spec = ToolSpec(
                public_name=config.public_name(backend.name, tool.name), server=backend.name,
                pool=self._settings.pool, tool=tool.name, title=tool.title, description=tool.description,
                input_schema=tool.input_schema, output_schema=tool.output_schema, annotations=annotations,
                registered_at_ms=now_ms(),
            )
            await registry.put_tool(spec)
        log.info("executor.tools_registered", backend=backend.name)

    async def _start_consumer(self) -> None:
        assert self._nc is not None and self._js is not None
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self._subjects.work_pool(self._settings.pool),
            ack_wait=self._pool.ack_wait_s,
            max_deliver=-1,  # the executor dead-letters by itself, so no call is ever dropped silently
            max_ack_pending=self._pool.concurrency * max(1, self._pool.workers) * 2,
        )
        await ensure_consumer(self._js, Stream.WORK, config)
        pull = PullSettings(Stream.WORK, self.durable, max_in_flight=self._pool.concurrency)
        self._consumer = PullConsumer(self._nc, pull, self.execute_call)
        await self._consumer.start()

    async def execute_call(self, msg: Msg) -> None:
        """Run one routed call and publish its final result, or NAK it for a retry."""
        try:
            work = unpack(WorkItem, msg.data)
        except (ValidationError, ValueError) as error:
            log.error("executor.bad_work_item", error=str(error))
            await msg.term()  # it can never be run; the router's events still hold the call
            return
        attempt = msg.metadata.num_delivered or 1
        with call_span("executor.execute", msg.headers, work.call_id):
            await self._attempt(work, msg, attempt)

    async def _attempt(self, work: WorkItem, msg: Msg, attempt: int) -> None:
        if await self._already_answered(work):
            log.info("call.already_answered", attempt=attempt)
            await msg.ack()
        elif attempt > self._pool.max_deliveries:
            await self._dead_letter(work, msg, attempt - 1, "delivered too often without finishing")
        else:
            await self._run_and_answer(work, msg, attempt)

    async def _run_and_answer(self, work: WorkItem, msg: Msg, attempt: int) -> None:
        assert self._outcomes is not None
        await self._outcomes.emit(EventKind.CALL_STARTED, **self._event_fields(work), attempt=attempt)
        started = time.perf_counter()
        try:
            response, status = await self._run(work, msg)
        except TransientFailure as failure:
            await self._retry_or_dead_letter(work, msg, attempt, str(failure))
            return
        except ToolbusError as error:
            response = error_response(work.request_id, work.call_id, error)
            status = CallStatus.TIMEOUT if isinstance(error, DeadlineExceeded) else CallStatus.FAILED
        await self._finish(work, msg, response, status, time.perf_counter() - started)

    async def _run(self, work: WorkItem, msg: Msg) -> tuple[ToolCallResponse, CallStatus]:
        """One attempt under the pool timeout or the call's deadline, whichever comes first."""
        budget_s, is_deadline = time_budget_s(work, self._pool.timeout_s)
        if budget_s <= 0:
            raise DeadlineExceeded("the call's deadline passed before it could run")
        backend = self._backends.get(work.server)
        if backend is None:
            raise TransientFailure(f"this worker has no backend {work.server!r}")
        try:
            async with asyncio.timeout(budget_s), self._keep_alive(msg):
                result = await backend.call_tool(work.tool, work.arguments, work.meta)
        except TimeoutError:
            if is_deadline:
                raise DeadlineExceeded("the call's deadline passed while it ran") from None
            raise TransientFailure(f"timed out after {budget_s:.1f}s") from None
        except BackendUnavailable as error:
            raise TransientFailure(str(error)) from error
        except MCPError as error:
            raise BackendError(f"backend error: {error.error.message}", backend_code=error.code) from error
        return success_response(work, result)

    @contextlib.asynccontextmanager
    async def _keep_alive(self, msg: Msg) -> AsyncIterator[None]:
        """Tell JetStream the call is still running (in-progress acks) so it is not redelivered."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._pool.ack_wait_s / 3)
                await msg.in_progress()

        task = asyncio.create_task(beat())
        IN_FLIGHT.labels(self._settings.pool).inc()
        try:
            yield
        finally:
            IN_FLIGHT.labels(self._settings.pool).dec()
            task.cancel()

    async def _finish(
        self, work: WorkItem, msg: Msg, response: ToolCallResponse, status: CallStatus, seconds: float
    ) -> None:
        assert self._outcomes is not None
        await self._outcomes.publish_result(work.call_id, response, status, work.reply_to)
        kind = EventKind.CALL_COMPLETED if status in (CallStatus.OK, CallStatus.TOOL_ERROR) else EventKind.CALL_FAILED
        reason = response.error.data.reason if response.error else None
        await self._outcomes.emit(kind, **self._event_fields(work), status=status, reason=reason,
                                  duration_ms=round(seconds * 1000, 3))
        await msg.ack()
        CALLS.labels(self._settings.pool, status.value).inc()
        CALL_SECONDS.labels(self._settings.pool).observe(seconds)
        log.info("call.finished", status=status.value, tool=work.public_tool, duration_ms=round(seconds * 1000, 3))

    async def _retry_or_dead_letter(self, work: WorkItem, msg: Msg, attempt: int, error: str) -> None:
        assert self._outcomes is not None
        if attempt >= self._pool.max_deliveries:
            await self._dead_letter(work, msg, attempt, error)
            return
        delay = backoff_delay(attempt, self._pool.backoff)
        await self._outcomes.emit(EventKind.CALL_RETRIED, **self._event_fields(work), attempt=attempt,
                                  reason=error, detail={"delay_s": round(delay, 3)})
        await msg.nak(delay=delay)
        CALLS.labels(self._settings.pool, "retried").inc()
        log.warning("call.retrying", attempt=attempt, error=error, delay_s=round(delay, 3))

    async def _dead_letter(self, work: WorkItem, msg: Msg, attempts: int, error: str) -> None:
        """Park the call in the DLQ with its failure and answer the producer `dead_lettered`."""
        assert self._js is not None and self._outcomes is not None
        record = DeadLetter(
            work=work,
            attempts=[
                Attempt(attempt=max(1, attempts), worker_id=self._settings.instance, error=error, at_ms=now_ms())
            ],
            dead_at_ms=now_ms(),
        )
        headers = {Header.MSG_ID: f"dlq-{work.call_id}", Header.CONTENT_TYPE: CONTENT_MSGPACK, **trace_headers()}
        await self._js.publish(self._subjects.dlq(work.pool), pack(record), headers=headers)
        failure = DeadLettered(f"gave up after {attempts} attempts: {error}", attempts=attempts)
        response = error_response(work.request_id, work.call_id, failure)
        await self._outcomes.publish_result(work.call_id, response, CallStatus.FAILED, work.reply_to)
        await self._outcomes.emit(EventKind.CALL_DEAD_LETTERED, **self._event_fields(work), attempt=attempts,
                                  status=CallStatus.FAILED, reason=failure.reason.value)
        await msg.ack()
        CALLS.labels(self._settings.pool, "dead_lettered").inc()
        log.error("call.dead_lettered", attempts=attempts, error=error)

    async def _already_answered(self, work: WorkItem) -> bool:
        """A call whose result is already stored must not run again: redelivered after its worker
        died between publishing and acking, or submitted again after CALLS' dedupe window."""
        assert self._js is not None
        try:
            await self._js.get_last_msg(Stream.RESULTS.value, self._subjects.result(work.call_id), direct=True)
        except NotFoundError:
            return False
        return True

    def _event_fields(self, work: WorkItem) -> dict[str, str]:
        return {"call_id": work.call_id, "principal": work.principal, "tool": work.public_tool, "pool": work.pool}


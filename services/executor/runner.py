"""One call's journey through a worker: answered already? → claimed → allowed → run → answered.

The order of checks, each able to end the call without running the tool:

1. a result is already stored (RESULTS) → ack;
2. delivered more than `max_deliveries` times → dead letter;
3. claim in Redis: held by a live worker → NAK later; done → ack; cancelled → answer `cancelled`;
4. deadline passed → `deadline_exceeded`;
5. the backend's shared breaker is open → `circuit_open`;

then the tool runs under min(pool timeout, deadline), with in-progress acks and claim refreshes.
Transient failures (backend down, pool timeout) are recorded, count against the breaker, and
are NAKed with full-jitter backoff, or dead-lettered with their whole history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from services.executor.backends import Backend, BackendResult, BackendUnavailable
from services.executor.breaker import SharedBreaker
from services.executor.execution import backoff_delay, final_limit, success_response, time_budget_s
from services.executor.ledger import CallLedger, ClaimOutcome
from services.executor.settlement import MAX_TOKENS_META, settle_call
from shared.budget_client import BudgetClient
from shared.codec import pack
from shared.config import PoolConfig
from shared.contracts import Attempt, CallStatus, DeadLetter, EventKind, ToolCallResponse, WorkItem
from shared.errors import (
    BackendError,
    CallRefused,
    Cancelled,
    CircuitOpen,
    DeadLettered,
    DeadlineExceeded,
    ToolbusError,
)
from shared.outcomes import Outcomes, error_response, now_ms
from shared.subjects import CONTENT_MSGPACK, Header, Stream, Subjects
from shared.telemetry import trace_headers

log = structlog.get_logger(__name__)

CALLS = Counter("toolbus_executor_calls_total", "Attempts finished by this worker", ["pool", "status"])
CALL_SECONDS = Histogram("toolbus_executor_call_seconds", "Backend call duration", ["pool"])
IN_FLIGHT = Gauge("toolbus_executor_in_flight", "Calls running in this worker", ["pool"])
CALL_ID_META = "io.toolbus/call_id"  # lets a backend tell which bus call it is serving
PROGRESS_TOKEN_META = "progressToken"  # noqa: S105  # an MCP _meta key, not a secret

Answer = tuple[ToolCallResponse, CallStatus] | ToolbusError
"""How an attempt ended: the tool's response with ok/tool_error, or the error to answer."""


class TransientFailure(Exception):
    """An attempt that may succeed if retried (backend down, pool timeout)."""


@dataclass
class Worker:
    """What a worker process brings to every call it runs."""

    instance: str
    pool_name: str
    pool: PoolConfig
    subjects: Subjects
    js: JetStreamContext
    outcomes: Outcomes
    ledger: CallLedger
    backends: dict[str, Backend]
    breakers: dict[str, SharedBreaker]
    budget: BudgetClient | None = None  # None when accounting is off
    settle_margin_s: float = 0.0  # a call with a budget hold ends this long before the hold expires
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    handling: set[str] = field(default_factory=set)  # call ids this worker has claimed and not yet acked
    cancel_requested: set[str] = field(default_factory=set)


class CallRunner:
    """Runs the calls a worker receives, one `handle` per message."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker

    def cancel(self, call_id: str) -> bool:
        """Cancel the call if it runs here; True if it did."""
        task = self.w.running.get(call_id)
        if task is None:
            return False
        self.w.cancel_requested.add(call_id)
        task.cancel()
        return True

    async def handle(self, msg: Msg, work: WorkItem) -> None:
        if work.call_id in self.w.handling:
            # Redelivered to this very worker while it still handles the call (its AckWait lapsed,
            # e.g. during a leader election): the Redis claim names this worker, so it cannot
            # stop a second run here; the first handling will ack the message.
            log.info("call.already_handled_here")
            await msg.nak(delay=self.w.pool.ack_wait_s)
            return
        self.w.handling.add(work.call_id)
        try:
            await self._handle(msg, work)
        finally:
            self.w.handling.discard(work.call_id)

    async def _handle(self, msg: Msg, work: WorkItem) -> None:
        attempt = msg.metadata.num_delivered or 1
        replay_id = msg.headers.get(Header.REPLAY) if msg.headers else None
        if replay_id and await self.w.ledger.begin_replay(work.call_id, replay_id):
            await self._reset_for_replay(work)
        # Both lookups at once: one round trip to NATS and one to Redis, in parallel.
        answered, outcome = await asyncio.gather(
            self._already_answered(work), self.w.ledger.claim(work.call_id, self.w.instance)
        )
        if answered:
            log.info("call.already_answered", attempt=attempt)
            await msg.ack()
        elif attempt > self.w.pool.max_deliveries:
            await self._dead_letter(work, msg, attempt - 1, "delivered too often without finishing")
        else:
            await self._claimed(work, msg, attempt, outcome)

    async def _claimed(self, work: WorkItem, msg: Msg, attempt: int, outcome: ClaimOutcome) -> None:
        if outcome is ClaimOutcome.HELD:
            log.info("call.held_elsewhere", attempt=attempt)
            await msg.nak(delay=self.w.pool.ack_wait_s)
        elif outcome is ClaimOutcome.DONE:
            await msg.ack()
        elif outcome is ClaimOutcome.CANCELLED:
            await self._finish(work, msg, Cancelled("cancelled before it ran"), 0.0)
        else:
            await self._run_claimed(work, msg, attempt)

    async def _run_claimed(self, work: WorkItem, msg: Msg, attempt: int) -> None:
        """Admit, run and answer a claimed call, keeping message and claim alive until the ack."""
        started = time.perf_counter()
        async with self._kept_alive(work, msg):
            try:
                await self._admit(work)
                started_event = self.w.outcomes.emit(EventKind.CALL_STARTED, **event_fields(work), attempt=attempt)
                answer: Answer = (
                    await asyncio.gather(started_event, self._run(work))
                )[1]
            except TransientFailure as failure:
                await self._retry_or_dead_letter(work, msg, attempt, str(failure))
                return
            except ToolbusError as error:
                answer = error
            await self._finish(work, msg, answer, time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def _kept_alive(self, work: WorkItem, msg: Msg) -> AsyncIterator[None]:
        """In-progress acks and claim refreshes for as long as the call is ours: through the tool
        run *and* through storing its result (which may wait out a stream leader election), so no
        other worker takes it over meanwhile."""
        beat = asyncio.create_task(self._keep_alive(work, msg))
        try:
            yield
        finally:
            beat.cancel()

    async def _admit(self, work: WorkItem) -> None:
        """Refuse a call whose deadline passed or whose backend's breaker is open."""
        budget_s, _ = time_budget_s(work, self.w.pool.timeout_s, self.w.settle_margin_s)
        if budget_s <= 0:
            limit = final_limit(work, self.w.settle_margin_s)
            raise DeadlineExceeded(f"the call's {limit} ran out before it could run")
        breaker = self.w.breakers.get(work.server)
        if breaker is not None:
            transition = await breaker.before_call(work.call_id)
            if transition is not None:
                await self._report_breaker(transition.new.value, work, transition.failures)

    async def _run(self, work: WorkItem) -> tuple[ToolCallResponse, CallStatus]:
        """One attempt under the pool timeout or the call's deadline, whichever comes first."""
        backend = self.w.backends.get(work.server)
        if backend is None:
            raise TransientFailure(f"this worker has no backend {work.server!r}")
        budget_s, is_deadline = time_budget_s(work, self.w.pool.timeout_s, self.w.settle_margin_s)
        meta = {**(work.meta or {}), CALL_ID_META: work.call_id}
        if work.budget is not None and work.budget.max_tokens is not None:
            meta[MAX_TOKENS_META] = work.budget.max_tokens
        try:
            async with self._running(work), asyncio.timeout(budget_s):
                result = await self._send(backend, work, meta)
        except TimeoutError:
            if is_deadline:
                limit = final_limit(work, self.w.settle_margin_s)
                raise DeadlineExceeded(f"the call's {limit} ran out while it ran") from None
            await self._breaker_failure(work)
            raise TransientFailure(f"timed out after {budget_s:.1f}s") from None
        except BackendUnavailable as error:
            await self._breaker_failure(work)
            raise TransientFailure(str(error)) from error
        except MCPError as error:
            raise BackendError(f"backend error: {error.error.message}", backend_code=error.code) from error
        await self._breaker_success(work)
        return success_response(work, result)

    async def _send(self, backend: Backend, work: WorkItem, meta: dict[str, Any]) -> BackendResult:
        """The request the call asked for: a tool call (progress forwarded), a resource read or a prompt.

        Log lines, sampling and elicitation the backend sends meanwhile are relayed to the call's caller.
        """
        with backend.serving(work.call_id, meta):
            if work.method == "resources/read":
                return await backend.read_resource(work.tool, meta)
            if work.method == "prompts/get":
                return await backend.get_prompt(work.tool, {k: str(v) for k, v in work.arguments.items()}, meta)
            return await backend.call_tool(work.tool, work.arguments, meta, self._progress_to_bus(work))

    def _progress_to_bus(self, work: WorkItem) -> ProgressFnT:
        """The tool's progress notifications, forwarded to `toolbus.progress.<call_id>` under the
        producer's own progress token (the call id when it sent none)."""
        token = (work.meta or {}).get(PROGRESS_TOKEN_META, work.call_id)

        async def forward(progress: float, total: float | None, message: str | None) -> None:
            params: dict[str, object] = {"progressToken": token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            await self.w.outcomes.publish_progress(work.call_id, params)

        return forward

    @contextlib.asynccontextmanager
    async def _running(self, work: WorkItem) -> AsyncIterator[None]:
        """While the tool runs: cancellable by call id, counted as in flight."""
        task = asyncio.current_task()
        assert task is not None
        self.w.running[work.call_id] = task
        IN_FLIGHT.labels(self.w.pool_name).inc()
        try:
            yield
        except asyncio.CancelledError:
            if work.call_id not in self.w.cancel_requested:
                raise  # the worker itself is shutting down
            task.uncancel()
            raise Cancelled("cancelled by the producer while it ran") from None
        finally:
            IN_FLIGHT.labels(self.w.pool_name).dec()
            self.w.running.pop(work.call_id, None)
            self.w.cancel_requested.discard(work.call_id)

    async def _keep_alive(self, work: WorkItem, msg: Msg) -> None:
        """Refresh the claim and the message's AckWait independently: during a stream leader
        election the in-progress ack can fail and the message be redelivered anyway, and then
        only a live claim keeps a second worker from running the call again."""
        while True:
            await asyncio.sleep(self.w.pool.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await self.w.ledger.refresh(work.call_id, self.w.instance)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _finish(
        self, work: WorkItem, msg: Msg, answer: Answer, seconds: float
    ) -> None:
        """Publish the final answer once, mark the call done, report it, ack."""
        response, status = self._response(work, answer)
        if self.w.budget is not None:
            # Before the result: a crash in between re-runs the call (settling again is a no-op)
            # rather than leaving a published call unsettled.
            await settle_call(self.w.budget, work, response, status)
        published = await self.w.outcomes.publish_result(work.call_id, response, status, work.reply_to)
        await asyncio.gather(
            self.w.ledger.complete(work.call_id, self.w.instance),
            self.w.outcomes.emit(
                _event_kind(status, answer), **event_fields(work), status=status,
                reason=response.error.data.reason if response.error else None,
                duration_ms=round(seconds * 1000, 3), detail={"latency_ms": now_ms() - work.accepted_at_ms},
                # the audit log keeps a result as its size and digest, never its content
                result_bytes=len(published), result_sha256=hashlib.sha256(published).hexdigest(),
            ),
        )
        await msg.ack()
        CALLS.labels(self.w.pool_name, status.value).inc()
        CALL_SECONDS.labels(self.w.pool_name).observe(seconds)
        log.info("call.finished", status=status.value, tool=work.public_tool, duration_ms=round(seconds * 1000, 3))

    @staticmethod
    def _response(work: WorkItem, answer: Answer) -> tuple[ToolCallResponse, CallStatus]:
        if isinstance(answer, tuple):
            return answer  # the tool ran: success_response already chose ok or tool_error
        if isinstance(answer, DeadlineExceeded):
            status = CallStatus.TIMEOUT
        else:
            status = CallStatus.REJECTED if isinstance(answer, CallRefused) else CallStatus.FAILED
        return error_response(work.request_id, work.call_id, answer), status

    async def _retry_or_dead_letter(self, work: WorkItem, msg: Msg, attempt: int, error: str) -> None:
        record = Attempt(attempt=attempt, worker_id=self.w.instance, error=error, at_ms=now_ms())
        await self.w.ledger.add_attempt(work.call_id, record)
        if attempt >= self.w.pool.max_deliveries:
            await self._dead_letter(work, msg, attempt, error)
            return
        await self.w.ledger.release(work.call_id, self.w.instance)
        delay = backoff_delay(attempt, self.w.pool.backoff)
        await self.w.outcomes.emit(EventKind.CALL_RETRIED, **event_fields(work), attempt=attempt, reason=error,
                                   detail={"delay_s": round(delay, 3)})
        await msg.nak(delay=delay)
        CALLS.labels(self.w.pool_name, "retried").inc()
        log.warning("call.retrying", attempt=attempt, error=error, delay_s=round(delay, 3))

    async def _dead_letter(self, work: WorkItem, msg: Msg, attempts: int, error: str) -> None:
        """Park the call in the DLQ with every attempt's failure and answer `dead_lettered`."""
        history = await self.w.ledger.attempts(work.call_id)
        record = DeadLetter(work=work, attempts=history, dead_at_ms=now_ms())
        headers = {Header.MSG_ID: f"dlq-{work.call_id}-{len(history)}", Header.CALL_ID: work.call_id,
                   Header.CONTENT_TYPE: CONTENT_MSGPACK, **trace_headers()}
        await self.w.js.publish(self.w.subjects.dlq(work.pool), pack(record), headers=headers)
        failure = DeadLettered(f"gave up after {attempts} attempts: {error}", attempts=attempts)
        await self._finish(work, msg, failure, 0.0)
        log.error("call.dead_lettered", attempts=attempts, error=error)

    async def _reset_for_replay(self, work: WorkItem) -> None:
        """A DLQ replay runs the call afresh: drop its claim, history and dead-lettered result."""
        await self.w.ledger.forget(work.call_id)
        with contextlib.suppress(NotFoundError):
            stored = await self.w.js.get_last_msg(Stream.RESULTS.value, self.w.subjects.result(work.call_id))
            if stored.seq is not None:
                await self.w.js.delete_msg(Stream.RESULTS.value, stored.seq)
        log.info("call.replaying")

    async def _already_answered(self, work: WorkItem) -> bool:
        """A call whose result is already stored must not run again: redelivered after its worker
        died between publishing and acking, or submitted again after CALLS' dedupe window."""
        try:
            await self.w.js.get_last_msg(Stream.RESULTS.value, self.w.subjects.result(work.call_id), direct=True)
        except NotFoundError:
            return False
        return True

    async def _breaker_failure(self, work: WorkItem) -> None:
        breaker = self.w.breakers.get(work.server)
        transition = await breaker.record_failure(work.call_id) if breaker else None
        if transition is not None:
            await self._report_breaker(transition.new.value, work, transition.failures)

    async def _breaker_success(self, work: WorkItem) -> None:
        breaker = self.w.breakers.get(work.server)
        transition = await breaker.record_success(work.call_id) if breaker else None
        if transition is not None:
            await self._report_breaker(transition.new.value, work, transition.failures)

    async def _report_breaker(self, state: str, work: WorkItem, failures: int) -> None:
        kind = {"open": EventKind.BREAKER_OPENED, "half_open": EventKind.BREAKER_HALF_OPEN}.get(
            state, EventKind.BREAKER_CLOSED
        )
        await self.w.outcomes.emit(kind, pool=work.pool, call_id=work.call_id,
                                   detail={"backend": work.server, "failures": failures})
        log.warning("breaker.changed", backend=work.server, state=state, failures=failures)


def _event_kind(status: CallStatus, answer: Answer) -> EventKind:
    if isinstance(answer, DeadLettered):
        return EventKind.CALL_DEAD_LETTERED
    if status in (CallStatus.OK, CallStatus.TOOL_ERROR):
        return EventKind.CALL_COMPLETED
    return EventKind.CALL_REJECTED if isinstance(answer, CircuitOpen) else EventKind.CALL_FAILED


def event_fields(work: WorkItem) -> dict[str, str | None]:
    """The fields every event about a call carries (the session lets the context store find its result)."""
    return {"call_id": work.call_id, "principal": work.principal, "tool": work.public_tool, "pool": work.pool,
            "session": work.session}

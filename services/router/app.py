"""Router service: one durable pull consumer on CALLS, routing each call or refusing it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from prometheus_client import Counter, Histogram

from services.router.auditing import argument_fields
from services.router.budgeting import reserve_budget
from services.router.decision import Decision, RoutingTable
from shared.budget_client import BudgetClient
from shared.bus import PullConsumer, PullSettings, connect, ensure_consumer, header, provision_streams
from shared.catalog import CatalogIndex
from shared.codec import pack
from shared.config import Config
from shared.contracts import CallStatus, CatalogEntry, EventKind, SetLimitRequest, ToolSpec, WorkItem
from shared.errors import DeadlineExceeded, InternalError
from shared.outcomes import Outcomes, error_response
from shared.registry import Registry, RegistryWatch, tool_named_by
from shared.subjects import CONTENT_MSGPACK, DEFAULT_PREFIX, Header, Stream, Subjects
from shared.telemetry import call_span, trace_headers

log = structlog.get_logger(__name__)

ROUTED = Counter("toolbus_router_calls_total", "Calls handled by the router", ["outcome", "reason"])
ROUTE_SECONDS = Histogram("toolbus_router_route_seconds", "Time to route or refuse one call")
DURABLE = "router"
BACKLOG_EVERY_S = 0.5
STOP_TASKS_S = 5.0


@dataclass(frozen=True)
class RouterSettings:
    """Where the router connects and how much it handles at once."""

    nats_url: str
    prefix: str = DEFAULT_PREFIX
    instance: str = "router"
    max_in_flight: int = 256
    ack_wait_s: float = 30.0


class RouterService:
    """Consumes CALLS; publishes work items, or refusals as results and events."""

    name = "router"

    def __init__(self, settings: RouterSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._table: RoutingTable | None = None
        self._consumer: PullConsumer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._outcomes: Outcomes | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        self._budget: BudgetClient | None = None

    @property
    def ready(self) -> bool:
        return self._consumer is not None

    async def start(self) -> None:
        """Connect, load config and tools, then start consuming."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        js = self._nc.jetstream()
        registry = await Registry.open(js, create=True)
        config = await registry.get_config()
        await provision_streams(js, self._subjects, replicas=config.nats.replicas)  # never downgrade R3 to R1
        self._table = RoutingTable(config, await registry.tools(), catalog=CatalogIndex.of(await registry.catalog()))
        self._budget = BudgetClient(self._nc, self._subjects, config.accounting.timeout_s)
        self._watch = asyncio.create_task(registry.watch(RegistryWatch(
            self._on_config, self._on_tool, self._on_budget_limits, self._on_entry, self._on_removed)))
        self._backlog_task = asyncio.create_task(self._watch_backlog(js))
        self._outcomes = Outcomes(self._nc, js, self._subjects, source=self._settings.instance)
        await ensure_consumer(js, Stream.CALLS, ConsumerConfig(durable_name=DURABLE, ack_wait=self._settings.ack_wait_s,
                                                                max_ack_pending=4 * self._settings.max_in_flight))
        pull = PullSettings(Stream.CALLS, DURABLE, max_in_flight=self._settings.max_in_flight)
        self._consumer = PullConsumer(self._nc, pull, self.route_call)
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop pulling, finish in-flight routing, disconnect."""
        if self._consumer is not None:
            await self._consumer.stop()
        tasks = {task for task in (self._watch, self._backlog_task) if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TASKS_S)
        if self._nc is not None:
            await self._nc.close()  # consumers are already stopped and every publish was acked

    async def _watch_backlog(self, js: JetStreamContext) -> None:
        """Keep calls stored in WORK per pool (waiting or running) current for backpressure."""
        assert self._table is not None
        while True:
            with contextlib.suppress(Exception):
                counts = await work_backlog(js, self._subjects)
                self._table.backlog.clear()
                self._table.backlog.update(counts)
            await asyncio.sleep(BACKLOG_EVERY_S)

    def _on_tool(self, spec: ToolSpec) -> None:
        assert self._table is not None
        self._table.tools[spec.public_name] = spec

    def _on_entry(self, key: str, entry: CatalogEntry) -> None:
        assert self._table is not None
        self._table.catalog.put(key, entry)

    def _on_removed(self, key: str) -> None:
        """A tool or catalog entry its backend no longer offers: calls to it become `unknown_tool`."""
        assert self._table is not None
        if (tool := tool_named_by(key)) is not None:
            self._table.tools.pop(tool, None)
        self._table.catalog.remove(key)

    def _on_config(self, config: Config) -> None:
        assert self._table is not None and self._budget is not None
        self._table = self._table.with_config(config)
        self._budget.timeout_s = config.accounting.timeout_s

    def _on_budget_limits(self, limits: list[SetLimitRequest]) -> None:
        assert self._table is not None
        self._table = self._table.with_runtime_limits(limits)

    async def route_call(self, msg: Msg) -> None:
        """Route or refuse one call from CALLS, then ack it (publish failures NAK it via the consumer)."""
        started = time.perf_counter()
        call_id = header(msg, Header.MSG_ID) or f"seq-{msg.metadata.sequence.stream}"
        with call_span("router.route", msg.headers, call_id):
            decision = self._decide(msg, call_id)
            await self._reserve_budget(decision)
            if decision.work is not None:
                await self._dispatch(decision.work, decision)
            else:
                await self._refuse(decision)
            await msg.ack()
        ROUTE_SECONDS.observe(time.perf_counter() - started)

    def _decide(self, msg: Msg, call_id: str) -> Decision:
        assert self._table is not None
        try:
            return self._table.decide(msg.headers or {}, msg.data, call_id)
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception("router.decide_failed", correlation_id=correlation_id)
            return Decision(call_id=call_id, refusal=InternalError(correlation_id))

    async def _reserve_budget(self, decision: Decision) -> None:
        """The last check before dispatch: hold the call's cost at the accountant (or refuse it)."""
        assert self._table is not None and self._budget is not None
        if decision.work is None or not self._table.is_budgeted(decision.scopes):
            return
        await reserve_budget(self._budget, self._table.config, decision)

    async def _dispatch(self, work: WorkItem, decision: Decision) -> None:
        assert self._nc is not None and self._outcomes is not None and self._table is not None
        headers = {
            Header.MSG_ID: work.call_id,  # a redelivered call is deduplicated by WORK
            Header.CALL_ID: work.call_id,
            Header.CONTENT_TYPE: CONTENT_MSGPACK,
            **trace_headers(),
        }
        await self._nc.jetstream().publish(self._subjects.work(work.pool, work.priority), pack(work), headers=headers)
        call = {"call_id": work.call_id, "principal": work.principal, "tool": work.public_tool, "pool": work.pool}
        await asyncio.gather(
            self._outcomes.emit(EventKind.CALL_ACCEPTED, **call, **argument_fields(decision, self._table.config.audit)),
            self._outcomes.emit(EventKind.CALL_DISPATCHED, **call, detail={
                "priority": work.priority, "hold_micros": work.budget.hold_micros if work.budget else None}),
        )
        ROUTED.labels("dispatched", "").inc()
        log.info("call.dispatched", tool=work.public_tool, pool=work.pool, priority=work.priority)

    async def _refuse(self, decision: Decision) -> None:
        assert self._outcomes is not None and decision.refusal is not None and self._table is not None
        refusal = decision.refusal
        status = CallStatus.TIMEOUT if isinstance(refusal, DeadlineExceeded) else CallStatus.REJECTED
        response = error_response(decision.request_id, decision.call_id, refusal)
        await self._outcomes.publish_result(decision.call_id, response, status, decision.reply_to)
        await self._outcomes.emit(
            EventKind.CALL_REJECTED,
            call_id=decision.call_id, principal=decision.principal, tool=decision.tool,
            status=status, reason=refusal.reason.value, **argument_fields(decision, self._table.config.audit),
        )
        ROUTED.labels("rejected", refusal.reason.value).inc()
        log.info("call.rejected", reason=refusal.reason.value, message=refusal.message, tool=decision.tool)


async def work_backlog(js: JetStreamContext, subjects: Subjects) -> dict[str, int]:
    """Messages stored in WORK per pool: one stream-info request with a subjects filter."""
    info = await js.stream_info(Stream.WORK.value, subjects_filter=subjects.stream_subjects(Stream.WORK)[0])
    per_pool: dict[str, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        pool = subject.split(".")[-2]  # <prefix>.work.<pool>.<priority>
        per_pool[pool] = per_pool.get(pool, 0) + count
    return per_pool

"""What `toolbus status` reports: per pool, its workers, queues, dead letters, breakers and recent latency.

Everything is read from NATS (streams, consumers, the registry and the worker roster); nothing is
written except a short-lived ephemeral consumer on EVENTS, which is deleted again. The queries run
concurrently so a status comes back in milliseconds on an idle mesh. No service logic lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError, NotFoundError
from pydantic import BaseModel, ConfigDict, Field

from shared.budget_client import AccountantUnavailable, BudgetClient
from shared.codec import unpack
from shared.config import Config, PoolConfig
from shared.contracts import Event, EventKind, ScopeBudget, StatusReply, StatusRequest, WorkerBeat
from shared.registry import Registry, WorkerRoster
from shared.subjects import WORKERS_BUCKET, Stream, Subjects, work_durable

log = structlog.get_logger(__name__)

PRIORITIES = range(4)  # 0 critical .. 3 low, one durable consumer each
WINDOW_S = 60.0  # calls/s and percentiles cover this much recent history
MIN_WINDOW_S = 1.0  # a brand-new EVENTS stream must not turn three calls into a huge rate
EVENTS_READ_TIMEOUT_S = 2.0  # a busy mesh gets a partial sample rather than a slow status
FETCH_BATCH = 512
BUDGET_TIMEOUT_S = 2.0  # no accountant (accounting off) costs a status at most this
FINAL_EVENTS = (EventKind.CALL_COMPLETED, EventKind.CALL_FAILED, EventKind.CALL_DEAD_LETTERED)


class PriorityStatus(BaseModel):
    """One priority lane of a pool's work queue."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(description="0 critical .. 3 low.")
    backlog: int = Field(description="Calls stored in WORK for this lane, including ones delivered but not yet "
                                     "acked (WORK is a work queue: a call leaves it only when acked).")
    ack_pending: int = Field(description="Delivered to a worker and not acked yet (running or lost in transit).")
    redelivered: int = Field(description="Calls currently delivered more than once (retries, silent workers).")


class BreakerStatus(BaseModel):
    """A backend's shared circuit breaker, as the pool's most recent heartbeat reported it."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    state: str = Field(description="closed, open or half_open.")
    failures: int
    retry_after_ms: int


class PoolStatus(BaseModel):
    """Health and load of one executor pool."""

    model_config = ConfigDict(extra="forbid")

    pool: str
    workers_alive: int = Field(description="Workers with a live heartbeat in `toolbus-workers`.")
    workers_configured: int = Field(description="Workers the config asks for (0 if the pool is not configured).")
    concurrency: int = Field(description="In-flight calls per worker, from the config.")
    in_flight: int = Field(description="Calls running now, summed over the live workers' heartbeats.")
    backlog_total: int = Field(description="Sum of the priorities' backlogs: stored in WORK, including delivered "
                                           "but unacked calls, so it never drops below ack_pending.")
    max_backlog: int = Field(description="The router refuses new calls beyond this many queued.")
    priorities: list[PriorityStatus]
    dlq: int = Field(description="Dead-lettered calls kept in the DLQ stream for this pool.")
    breakers: list[BreakerStatus]
    calls_per_s: float = Field(description="Final outcomes (completed, failed, dead-lettered) per second.")
    p50_ms: float | None = Field(description="Median end-to-end latency (router acceptance to result), if known.")
    p99_ms: float | None = Field(description="99th percentile end-to-end latency, if known.")
    window_s: float = Field(description="Seconds the rate and percentiles cover: 60, or the EVENTS stream's age.")
    workers: list[WorkerBeat] = Field(description="Each live worker's last heartbeat.")


class MeshStatus(BaseModel):
    """`toolbus status --json`: every served or live pool at one moment."""

    model_config = ConfigDict(extra="forbid")

    collected_at_ms: int
    pools: list[PoolStatus]
    budgets: list[ScopeBudget] = Field(default_factory=list, description="Every budget in its current window.")
    budgets_ok: bool | None = Field(default=None, description="False while Redis needs `toolbus budget rebuild`; "
                                    "None when no accountant answered.")


@dataclass
class RecentCalls:
    """Final call events of the last window, grouped by pool."""

    window_s: float
    counts: dict[str, int] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Snapshot:
    """Raw answers of every query, before they are shaped into pools."""

    config: Config
    beats: list[WorkerBeat]
    consumers: dict[str, tuple[int, int]]  # durable -> (ack pending, redelivered)
    work: dict[str, int]  # WORK subject -> stored messages
    dlq: dict[str, int]  # DLQ subject -> stored messages
    calls: RecentCalls


async def collect_status(nc: NatsClient, subjects: Subjects) -> MeshStatus:
    """Query everything concurrently and shape it into one status per pool."""
    js = nc.jetstream()
    now = _now_ms()
    (config, beats, consumers), work, dlq, calls, spend = await asyncio.gather(
        _roster_and_consumers(js),
        _stored_per_subject(js, Stream.WORK, subjects.work_pool("*")),
        _stored_per_subject(js, Stream.DLQ, subjects.dlq("*")),
        recent_calls(js, subjects, now),
        _spend(nc, subjects),
    )
    snapshot = _Snapshot(config, beats, consumers, work, dlq, calls)
    pools = [_pool_status(pool, snapshot, subjects) for pool in pool_names(config, beats)]
    budgets, budgets_ok = (spend.budgets, spend.counters_ok) if spend else ([], None)
    return MeshStatus(collected_at_ms=now, pools=pools, budgets=budgets, budgets_ok=budgets_ok)


async def _spend(nc: NatsClient, subjects: Subjects) -> StatusReply | None:
    """Every budget from the accountant, or None if none answers (accounting off, or down)."""
    try:
        return await BudgetClient(nc, subjects, BUDGET_TIMEOUT_S).status(StatusRequest())
    except AccountantUnavailable:
        return None


def pool_names(config: Config, beats: Iterable[WorkerBeat]) -> list[str]:
    """Pools serving at least one server, plus any pool with live workers (e.g. from an older config)."""
    return sorted({server.pool for server in config.servers.values()} | {beat.pool for beat in beats})


async def _roster_and_consumers(
    js: JetStreamContext,
) -> tuple[Config, list[WorkerBeat], dict[str, tuple[int, int]]]:
    """Config and heartbeats first, since together they decide which pools' consumers to ask about."""
    config, beats = await asyncio.gather(_config(js), live_beats(js))
    durables = [work_durable(pool, p) for pool in pool_names(config, beats) for p in PRIORITIES]
    counts = await asyncio.gather(*(_consumer_counts(js, durable) for durable in durables))
    return config, beats, dict(zip(durables, counts, strict=True))


async def _config(js: JetStreamContext) -> Config:
    """The live config; raises RegistryNotReady when no mesh was ever started on this NATS."""
    return await (await Registry.open(js)).get_config()


async def live_beats(js: JetStreamContext) -> list[WorkerBeat]:
    """Every live worker's heartbeat; binding (not creating) the bucket, so a status never provisions."""
    try:
        kv = await js.key_value(WORKERS_BUCKET)
    except BucketNotFoundError:
        return []
    return await WorkerRoster(kv).beats()


async def _consumer_counts(js: JetStreamContext, durable: str) -> tuple[int, int]:
    """(ack pending, redelivered) of one WORK consumer; one no worker created yet has nothing pending."""
    try:
        info = await js.consumer_info(Stream.WORK.value, durable)
    except NotFoundError:
        return 0, 0
    return info.num_ack_pending or 0, info.num_redelivered or 0


async def _stored_per_subject(js: JetStreamContext, stream: Stream, subjects_filter: str) -> dict[str, int]:
    """Messages stored per subject, in one request for every pool (the server counts, we read nothing)."""
    try:
        info = await js.stream_info(stream.value, subjects_filter=subjects_filter)
    except NotFoundError:
        return {}
    return dict(info.state.subjects or {})  # the server omits `subjects` when nothing matches


async def recent_calls(js: JetStreamContext, subjects: Subjects, now_ms: int) -> RecentCalls:
    """Final call events stored in the last WINDOW_S seconds, with the window they really cover."""
    created_ms, events = await asyncio.gather(
        _stream_created_ms(js, Stream.EVENTS), _read_events_since(js, subjects, now_ms - int(WINDOW_S * 1000))
    )
    age_s = (now_ms - created_ms) / 1000 if created_ms is not None else WINDOW_S
    window_s = round(max(MIN_WINDOW_S, min(WINDOW_S, age_s)), 3)
    return _group_by_pool(events, window_s)


def _group_by_pool(events: Iterable[Event], window_s: float) -> RecentCalls:
    """Count every event of a pool; keep latencies only where the event carries one."""
    counts: dict[str, int] = defaultdict(int)
    latencies: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.pool is not None:
            counts[event.pool] += 1
            _add_latency(latencies[event.pool], event)
    return RecentCalls(window_s, dict(counts), dict(latencies))


def _add_latency(latencies: list[float], event: Event) -> None:
    """Events from before latency was recorded count toward the rate but not the percentiles."""
    latency = event.detail.get("latency_ms")
    if isinstance(latency, int | float) and not isinstance(latency, bool):
        latencies.append(float(latency))


async def _stream_created_ms(js: JetStreamContext, stream: Stream) -> int | None:
    """When a stream was created: a younger stream shortens the rate's window."""
    try:
        info = await js.stream_info(stream.value)
    except NotFoundError:
        return None
    return int(info.created.timestamp() * 1000) if info.created is not None else None


async def _read_events_since(js: JetStreamContext, subjects: Subjects, since_ms: int) -> list[Event]:
    """Read the final call events stored since `since_ms` through a throwaway consumer.

    The consumer's `num_pending` at creation says how many there are, so reading stops as soon as
    they are all in instead of waiting for a fetch to time out.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.fromtimestamp(since_ms / 1000, tz=UTC),
        filter_subjects=[subjects.event(kind.value) for kind in FINAL_EVENTS],
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,  # the server removes it even if we die before deleting it
        mem_storage=True,
    )
    try:
        info = await js.add_consumer(Stream.EVENTS.value, config)
    except NotFoundError:
        return []
    try:
        return await _fetch_events(js, info.name, info.num_pending or 0)
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await js.delete_consumer(Stream.EVENTS.value, info.name)


async def _fetch_events(js: JetStreamContext, consumer: str, pending: int) -> list[Event]:
    """Fetch `pending` messages (bounded by EVENTS_READ_TIMEOUT_S) and decode the valid ones."""
    messages: list[Msg] = []
    if pending == 0:
        return []
    sub = await js.pull_subscribe_bind(consumer, stream=Stream.EVENTS.value)
    try:
        async with asyncio.timeout(EVENTS_READ_TIMEOUT_S):
            while len(messages) < pending:
                batch = min(FETCH_BATCH, pending - len(messages))
                messages += await sub.fetch(batch, timeout=EVENTS_READ_TIMEOUT_S)
    except TimeoutError:
        log.warning("status.events_partial", read=len(messages), pending=pending)
    finally:
        await sub.unsubscribe()
    return [event for event in map(_decode_event, messages) if event is not None]


def _decode_event(msg: Msg) -> Event | None:
    """An event, or None for a message that is not one (it must not break the status)."""
    try:
        return unpack(Event, msg.data)
    except ValueError:  # pydantic's ValidationError and msgpack's errors are ValueErrors
        return None


def _pool_status(pool: str, snapshot: _Snapshot, subjects: Subjects) -> PoolStatus:
    """Shape the raw answers that concern one pool."""
    configured = snapshot.config.pools.get(pool)
    settings = configured or PoolConfig()
    workers = sorted((b for b in snapshot.beats if b.pool == pool), key=lambda b: b.instance)
    priorities = _priorities(pool, snapshot, subjects)
    count = snapshot.calls.counts.get(pool, 0)
    latencies = sorted(snapshot.calls.latencies_ms.get(pool, []))
    return PoolStatus(
        pool=pool, workers_alive=len(workers), workers_configured=configured.workers if configured else 0,
        concurrency=settings.concurrency if configured else max((b.concurrency for b in workers), default=0),
        in_flight=sum(b.in_flight for b in workers), backlog_total=sum(p.backlog for p in priorities),
        max_backlog=settings.max_backlog, priorities=priorities,
        dlq=snapshot.dlq.get(subjects.dlq(pool), 0), breakers=merge_breakers(workers),
        calls_per_s=round(count / snapshot.calls.window_s, 3), p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99), window_s=snapshot.calls.window_s, workers=workers,
    )


def _priorities(pool: str, snapshot: _Snapshot, subjects: Subjects) -> list[PriorityStatus]:
    """Backlog from the stream, ack pending and redeliveries from each priority's consumer."""
    lanes = []
    for priority in PRIORITIES:
        ack_pending, redelivered = snapshot.consumers.get(work_durable(pool, priority), (0, 0))
        backlog = snapshot.work.get(subjects.work(pool, priority), 0)
        lanes.append(PriorityStatus(priority=priority, backlog=backlog, ack_pending=ack_pending,
                                    redelivered=redelivered))
    return lanes


def merge_breakers(beats: Iterable[WorkerBeat]) -> list[BreakerStatus]:
    """One view per backend: the most recent heartbeat's, since breakers are shared and beats age."""
    merged: dict[str, BreakerStatus] = {}
    for beat in sorted(beats, key=lambda b: b.beat_at_ms):  # newer beats overwrite older ones
        for backend, view in beat.breakers.items():
            merged[backend] = BreakerStatus(backend=backend, state=view.state, failures=view.failures,
                                            retry_after_ms=view.retry_after_ms)
    return [merged[name] for name in sorted(merged)]


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile: always a value that was observed, None without observations."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000

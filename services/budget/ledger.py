"""The budget ledger: every reserve, settle and release is also an event in EVENTS.

Redis is fast but can lose its data; the ledger cannot (JetStream, replicated in a cluster).
`fold` turns the ledger back into counters and open holds, and `rebuild` writes them to Redis.
Folding is idempotent per call id, so a ledger event published twice (a retried settle) counts
once, and order-tolerant where it matters: a settlement wins over a release or an expiry,
because a call that really finished cost money even if its hold had been freed.

The ledger lives in EVENTS, which keeps 7 days: a rebuild restores day windows fully and
month and total windows as far as the ledger reaches (see docs/operations.md).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from services.budget.accountant import RECORD_KEEP_S, Accountant, Bucket
from services.budget.limits import LimitBook
from services.budget.windows import keep_s
from shared.codec import unpack
from shared.contracts import Event, EventKind, HoldState
from shared.contracts.budget import Window
from shared.subjects import Stream, Subjects

LEDGER_KINDS = (EventKind.BUDGET_RESERVED, EventKind.BUDGET_SETTLED, EventKind.BUDGET_RELEASED, EventKind.BUDGET_ALERT)
WINDOW_PREFIXES: dict[str, Window] = {"d": "day", "m": "month"}


@dataclass
class CallEntry:
    """One call as the ledger tells it."""

    buckets: list[str] = field(default_factory=list)
    hold: int = 0
    tool: str = ""
    expires_at_ms: int = 0
    max_tokens: int = -1
    state: HoldState = HoldState.HELD
    actual: int = 0
    model: str = ""
    freed_before_settle: bool = False


@dataclass
class Folded:
    """Counters and open holds rebuilt from the ledger."""

    calls: dict[str, CallEntry] = field(default_factory=dict)
    alerts: set[tuple[str, str]] = field(default_factory=set)  # (bucket, threshold label) already fired

    def counters(self) -> dict[str, dict[str, int]]:
        """Per bucket: spent, held, overrun, late and the per-tool and per-model breakdown."""
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for entry in self.calls.values():
            for bucket in entry.buckets:
                _add(totals[bucket], entry)
        return totals


def _add(counter: dict[str, int], entry: CallEntry) -> None:
    if entry.state is HoldState.HELD:
        counter["held"] += entry.hold
    if entry.state is not HoldState.SETTLED:
        return
    counter["spent"] += entry.actual
    if entry.actual:
        counter[f"tool:{entry.tool}"] += entry.actual
        if entry.model:
            counter[f"model:{entry.model}"] += entry.actual
    if entry.freed_before_settle:
        counter["late"] += entry.actual
    elif entry.actual > entry.hold:
        counter["overrun"] += entry.actual - entry.hold


def fold(events: Iterable[Event]) -> Folded:
    """Replay ledger events (in stream order) into calls and fired alerts."""
    folded = Folded()
    for event in events:
        if event.kind is EventKind.BUDGET_ALERT:
            folded.alerts.add((str(event.detail.get("bucket")), str(event.detail.get("threshold"))))
        elif event.call_id is not None:
            _apply(folded.calls, event.call_id, event)
    return folded


def _tokens(value: object) -> int:
    """The hold's token cap as stored in a hold record: -1 for none (0 is a real cap)."""
    return -1 if value is None else int(str(value))


def _apply(calls: dict[str, CallEntry], call_id: str, event: Event) -> None:
    entry = calls.get(call_id)
    if event.kind is EventKind.BUDGET_RESERVED:
        if entry is None:  # a repeated reserve event changes nothing
            calls[call_id] = CallEntry(
                buckets=list(event.buckets), hold=event.cost_micros or 0, tool=event.tool or "",
                expires_at_ms=int(event.detail.get("expires_at_ms") or 0),
                max_tokens=_tokens(event.detail.get("max_tokens")),
            )
    elif entry is None:
        return  # a settle or release of a hold the ledger never saw reserved: nothing was charged
    elif event.kind is EventKind.BUDGET_SETTLED and entry.state is not HoldState.SETTLED:
        entry.freed_before_settle = entry.state is not HoldState.HELD
        entry.state, entry.actual = HoldState.SETTLED, event.cost_micros or 0
        entry.model = str(event.detail.get("model") or "")
    elif event.kind is EventKind.BUDGET_RELEASED and entry.state is HoldState.HELD:
        entry.state = HoldState.EXPIRED if event.reason == HoldState.EXPIRED.value else HoldState.RELEASED


async def read_ledger(js: JetStreamContext, subjects: Subjects) -> list[Event]:
    """Every budget event still in EVENTS, in stream order (the order they were written).

    Stream order, not timestamps: two accountant replicas stamp events with their own clocks,
    and a settle must never be folded before the reserve it settles.
    """
    subject = subjects.event("budget.>")
    info = await js.stream_info(Stream.EVENTS.value, subjects_filter=subject)
    stored = sum((info.state.subjects or {}).values())
    events: list[Event] = []
    if not stored:
        return events
    subscription = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        for _ in range(stored):
            msg = await subscription.next_msg(timeout=10)
            event = unpack(Event, msg.data)
            if event.kind in LEDGER_KINDS:
                events.append(event)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()
    return events


def bucket_of(accountant: Accountant, name: str, book: LimitBook) -> Bucket:
    """A bucket rebuilt from its name (`<scope>:<window key>`) and the limits now in force."""
    scope, window_part = name.rsplit(":", 1)
    window: Window = WINDOW_PREFIXES.get(window_part[:1], "total")  # d20261121, m202611 or total
    limit = book.spend.get((scope, window))
    limit_micros = limit.limit_micros if limit else 0
    alerts = limit.thresholds() if limit else []
    return Bucket(accountant.spend_key(name), name, limit_micros, keep_s(window) or 0, alerts)


async def write_folded(accountant: Accountant, folded: Folded, book: LimitBook) -> None:
    """Replace every counter and hold in Redis by the folded ledger (the caller guards the epoch)."""
    redis = accountant.redis
    stale = [key async for key in redis.scan_iter(match=f"{accountant.base}:spend:*", count=500)]
    stale += [key async for key in redis.scan_iter(match=f"{accountant.base}:hold:*", count=500)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in [*stale, accountant.holds_key]:
            pipe.delete(key)
        for name, counter in folded.counters().items():
            fields: dict[FieldT, EncodableT] = {k: v for k, v in counter.items() if v}
            fields.update({f"alert:{label}": 1 for bucket, label in folded.alerts if bucket == name})
            if fields:
                pipe.hset(accountant.spend_key(name), mapping=fields)
        for call_id, entry in folded.calls.items():
            _write_hold(pipe, accountant, call_id, entry, book)
        await pipe.execute()


def _write_hold(pipe: Pipeline, accountant: Accountant, call_id: str, entry: CallEntry, book: LimitBook) -> None:
    """Recreate a hold record, so a late settle or release is still idempotent after a rebuild."""
    key = accountant.hold_key(call_id)
    buckets = [bucket_of(accountant, name, book).as_spec() for name in entry.buckets]
    fields: dict[FieldT, EncodableT] = {
        "state": entry.state.value, "amount": entry.hold, "tool": entry.tool, "expires": entry.expires_at_ms,
        "max_tokens": entry.max_tokens, "buckets": json.dumps(buckets), "token_keys": "[]",
    }
    if entry.state is HoldState.SETTLED:
        overrun = 0 if entry.freed_before_settle else max(entry.actual - entry.hold, 0)
        fields.update({"actual": entry.actual, "overrun": overrun,
                       "late": int(entry.freed_before_settle)})
    pipe.hset(key, mapping=fields)
    pipe.expire(key, RECORD_KEEP_S)
    if entry.state is HoldState.HELD:
        pipe.zadd(accountant.holds_key, {call_id: entry.expires_at_ms})

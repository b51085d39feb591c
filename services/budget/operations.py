"""The accountant's operations: reserve, settle, release, reap and show, each with its ledger event.

Knows nothing about NATS: the app hands it an `emit` for ledger events and a clock. Ordering
rule: Redis first (the atomic check), then the ledger event, then the reply. A reserve whose
ledger event cannot be written is undone and refused, so the ledger never misses a hold; a
settle or release is idempotent, and its event is published again on a repeat, so a retry by
the executor repairs a lost event.

Fail closed: any Redis error, a timeout, or a Redis that lost its counters (epoch mismatch)
makes reserve refuse with reason `unavailable`. No call reaches a backend unbudgeted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.exceptions import RedisError

from services.budget.accountant import Accountant, Bucket, Counter, Reservation
from services.budget.limits import LimitBook, RateLimit, SpendLimit
from services.budget.pricing import actual_cost, estimate
from services.budget.windows import resets_at_ms, window_key
from shared.config import Config
from shared.contracts import (
    BudgetHold,
    EventKind,
    HoldState,
    LedgerReply,
    Refusal,
    RefusalReason,
    ReleaseRequest,
    ReserveReply,
    ReserveRequest,
    ScopeBudget,
    SettleRequest,
    StatusReply,
    StatusRequest,
)

log = structlog.get_logger(__name__)

REDIS_TIMEOUT_S = 1.0  # a Redis slower than this fails the reserve closed
UNAVAILABLE_RETRY_MS = 1000
Clock = Callable[[], int]


class Emit(Protocol):
    """Publishes events durably (`shared.outcomes.Outcomes.emit`); a `dedupe` field is a message-id
    suffix keeping apart several events of one kind about one call, not part of the event."""

    def __call__(self, *kinds: EventKind, **fields: Any) -> Awaitable[None]: ...


@dataclass
class Books:
    """What the operations consult: config (prices, accounting settings) and the limits in force."""

    config: Config
    limits: LimitBook
    epoch: str = ""
    counters_ok: bool = True  # False once Redis is found without our epoch: refuse until rebuilt


class BudgetOperations:
    """Reserve, settle, release and reap against one Accountant."""

    def __init__(self, accountant: Accountant, books: Books, emit: Emit, clock: Clock) -> None:
        self.accountant = accountant
        self.books = books
        self._emit = emit
        self._clock = clock

    # --- reserve -----------------------------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> ReserveReply:
        """Hold the call's estimated cost on every scope, or refuse it; never raises."""
        limits = self.books.limits.spend_limits(request.scopes)
        rates = self.books.limits.rate_limits(request.scopes)
        if not limits and not rates:
            return ReserveReply(call_id=request.call_id, tool=request.tools[0])  # nothing to account against
        if not self.books.counters_ok:
            return self._unavailable(request, "budget counters were lost; run `toolbus budget rebuild`")
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                return await self._reserve(request, limits, rates)
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("budget.reserve_failed_closed", call_id=request.call_id, error=repr(error))
            return self._unavailable(request, "budget accounting is unavailable")

    async def _reserve(self, request: ReserveRequest, limits: list[SpendLimit], rates: list[RateLimit]) -> ReserveReply:
        now = self._clock()
        buckets = [self.accountant.bucket(limit, now) for limit in limits]
        tool = await self._choose_tool(request.tools, buckets)
        cost = estimate(self.books.config, tool)
        expires = request.start_by_ms + request.run_ms + int(self.books.config.accounting.settle_margin_s * 1000)
        result = await self.accountant.reserve(
            request.call_id, amount_micros=cost.hold_micros, tool=tool, buckets=buckets, rates=rates,
            expires_at_ms=expires, max_tokens=cost.max_tokens, now_ms=now, epoch=self.books.epoch,
        )
        if result.outcome == "epoch":
            self.books.counters_ok = False
            log.error("budget.counters_lost", hint="run `toolbus budget rebuild`")
            return self._unavailable(request, "budget counters were lost; run `toolbus budget rebuild`")
        if result.outcome in ("rate", "budget"):
            return await self._refuse(request, result)
        if result.outcome == "ok":
            await self._ledger_reserved(request, result, [b.name for b in buckets])
        return _granted(request.call_id, result)

    async def _choose_tool(self, tools: list[str], buckets: list[Bucket]) -> str:
        """Cost-aware routing: the economy tool when any scope has less than `economy_below` left."""
        if len(tools) < 2 or not buckets:  # the tool and its economy alternative
            return tools[0]
        counters = await self.accountant.counters([bucket.name for bucket in buckets])
        below = self.books.config.accounting.economy_below
        low = any(b.limit_micros == 0 or (b.limit_micros - c.spent - c.held) / b.limit_micros < below
                  for b, c in zip(buckets, counters, strict=True))
        return tools[1] if low else tools[0]

    async def _ledger_reserved(self, request: ReserveRequest, result: Reservation, buckets: list[str]) -> None:
        """Write the hold to the ledger; if that fails, undo it so Redis never holds more than the ledger."""
        try:
            await self._emit(EventKind.BUDGET_RESERVED, call_id=request.call_id, principal=request.principal,
                             tool=result.tool, cost_micros=result.amount_micros, buckets=buckets,
                             detail={"expires_at_ms": result.expires_at_ms, "max_tokens": result.max_tokens})
        except Exception:
            await self.accountant.release(request.call_id, now_ms=self._clock())
            raise

    async def _refuse(self, request: ReserveRequest, result: Reservation) -> ReserveReply:
        if result.outcome == "rate":
            limit = "requests" if result.rate_kind == "req" else "tokens"
            refusal = Refusal(reason=RefusalReason.RATE_LIMITED, scope=result.scope,
                              retry_after_ms=result.retry_after_ms,
                              message=f"{limit} per minute of {result.scope} used up; "
                                      f"retry in {result.retry_after_ms} ms")
        else:
            scope = (result.scope or "").rsplit(":", 1)[0]
            refusal = Refusal(reason=RefusalReason.BUDGET_EXCEEDED, scope=scope,
                              message=f"the budget of {scope} would be exceeded "
                                      f"(window {result.scope}, {result.remaining_micros} micro-USD left)")
        await self._emit(EventKind.BUDGET_EXCEEDED, call_id=request.call_id, principal=request.principal,
                         tool=request.tools[0], reason=refusal.reason.value,
                         detail={"scope": refusal.scope, "retry_after_ms": refusal.retry_after_ms})
        return ReserveReply(call_id=request.call_id, refusal=refusal)

    @staticmethod
    def _unavailable(request: ReserveRequest, message: str) -> ReserveReply:
        refusal = Refusal(reason=RefusalReason.UNAVAILABLE, message=f"{message}; the call was refused so nothing "
                          "runs unbudgeted", retry_after_ms=UNAVAILABLE_RETRY_MS)
        return ReserveReply(call_id=request.call_id, refusal=refusal)

    # --- settle and release ------------------------------------------------------------------

    async def settle(self, request: SettleRequest) -> LedgerReply:
        """Charge the actual cost in place of the hold (once) and record it in the ledger."""
        actual, model = actual_cost(self.books.config, request.tool, request.usage)
        try:
            done = await self.accountant.settle(request.call_id, actual_micros=actual, tool=request.tool,
                                                model=model, usage=request.usage, now_ms=self._clock())
        except (RedisError, OSError) as error:
            # The ledger still learns the cost now (a rebuild counts it); the executor retries for Redis.
            await self._emit(EventKind.BUDGET_SETTLED, call_id=request.call_id, tool=request.tool,
                             cost_micros=actual, detail={"model": model, "outcome": "redis_unavailable"})
            return LedgerReply(call_id=request.call_id, state=HoldState.HELD, changed=False,
                               error=f"redis unavailable: {type(error).__name__}")
        await self._emit(EventKind.BUDGET_SETTLED, call_id=request.call_id, tool=request.tool,
                         cost_micros=done.actual_micros if done.outcome == "dup" else actual,
                         detail={"hold_micros": done.hold_micros, "overrun_micros": done.overrun_micros,
                                 "late": done.late, "model": model, "outcome": done.outcome})
        for bucket, threshold in done.alerts:
            await self._emit(EventKind.BUDGET_ALERT, call_id=request.call_id, tool=request.tool,
                             dedupe=f"{bucket}@{threshold}",  # one message id per alert, not per call
                             detail={"bucket": bucket, "scope": bucket.rsplit(":", 1)[0], "threshold": threshold})
        if done.overrun_micros or done.late:
            log.warning("budget.over_hold", call_id=request.call_id, overrun_micros=done.overrun_micros,
                        late=done.late)
        state = HoldState.NONE if done.outcome == "unknown" else HoldState.SETTLED
        return LedgerReply(call_id=request.call_id, state=state, changed=done.outcome == "settled",
                           actual_micros=done.actual_micros if done.outcome == "dup" else actual,
                           overrun_micros=done.overrun_micros, late=done.late)

    async def release(self, request: ReleaseRequest, *, expired: bool = False) -> LedgerReply:
        """Free the hold (once) and record it in the ledger."""
        done = await self.accountant.release(request.call_id, now_ms=self._clock(), expired=expired)
        if done.outcome == "not_due":
            return LedgerReply(call_id=request.call_id, state=HoldState.HELD, changed=False)
        state = HoldState(done.state) if done.state in set(HoldState) else HoldState.NONE
        if done.outcome != "unknown":
            await self._emit(EventKind.BUDGET_RELEASED, call_id=request.call_id, cost_micros=done.amount_micros,
                             reason=state.value if done.outcome == "released" else request.reason,
                             detail={"outcome": done.outcome, "why": request.reason})
        return LedgerReply(call_id=request.call_id, state=state, changed=done.outcome == "released")

    async def reap(self) -> int:
        """Free every hold whose expiry has come; returns how many this replica freed."""
        freed = 0
        for call_id in await self.accountant.due_holds(self._clock()):
            reply = await self.release(ReleaseRequest(call_id=call_id, reason="expired"), expired=True)
            if reply.changed:
                freed += 1
                log.warning("budget.hold_expired", call_id=call_id)
        return freed

    # --- status ------------------------------------------------------------------------------

    async def status(self, request: StatusRequest) -> StatusReply:
        """Every limit (or one scope's) in its current window, with spend, holds and breakdowns."""
        now = self._clock()
        limits = [limit for limit in self.books.limits.spend.values() if request.scope in (None, limit.scope)]
        limits.sort(key=lambda limit: (limit.scope, limit.window))
        names = [self.accountant.bucket(limit, now).name for limit in limits]
        counters = await self.accountant.counters(names)
        budgets = [_scope_budget(limit, counter, now, self.books.limits) for limit, counter in
                   zip(limits, counters, strict=True)]
        rated = {b.scope for b in budgets}
        budgets += [ScopeBudget(scope=rate.scope, window=None, rpm=rate.rpm, tpm=rate.tpm)
                    for rate in self.books.limits.rates.values()
                    if rate.scope not in rated and request.scope in (None, rate.scope)]
        return StatusReply(budgets=budgets, counters_ok=self.books.counters_ok)


def _granted(call_id: str, result: Reservation) -> ReserveReply:
    hold = BudgetHold(hold_micros=result.amount_micros, max_tokens=result.max_tokens,
                      expires_at_ms=result.expires_at_ms or 0)
    return ReserveReply(call_id=call_id, tool=result.tool, hold=hold, state=result.state)


def _scope_budget(limit: SpendLimit, counter: Counter, now: int, book: LimitBook) -> ScopeBudget:
    rate = book.rates.get(limit.scope)
    return ScopeBudget(
        scope=limit.scope, window=limit.window, window_key=window_key(limit.window, now),
        resets_at_ms=resets_at_ms(limit.window, now), limit_micros=limit.limit_micros,
        spent_micros=counter.spent, held_micros=counter.held,
        remaining_micros=max(limit.limit_micros - counter.spent - counter.held, 0),
        overrun_micros=counter.overrun, late_micros=counter.late, by_tool=counter.by_tool,
        by_model=counter.by_model, alert_at=list(limit.alert_at), rpm=rate.rpm if rate else None,
        tpm=rate.tpm if rate else None, source="runtime" if limit.source == "runtime" else "config",
    )


def new_epoch() -> str:
    """A fresh epoch id for a Redis whose counters were (re)built."""
    return uuid.uuid4().hex

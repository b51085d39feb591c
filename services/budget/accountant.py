"""Spend counters, holds and rate windows in Redis; every change is one Lua script.

Keys (all under one hash tag, so a Redis Cluster keeps them in one slot and the scripts stay
atomic)::

    {<prefix>:budget}:epoch                    which rebuild of the counters this Redis holds
    {<prefix>:budget}:spend:<scope>:<window>   hash: spent, held, overrun, late, tool:<t>, model:<m>,
                                               alert:<fraction>   (window = d20261121 | m202611 | total)
    {<prefix>:budget}:hold:<call_id>           hash: state, amount, buckets, expires, actual, ...
    {<prefix>:budget}:holds                    zset of held call ids by expiry, for the reaper
    {<prefix>:budget}:rate:<scope>:req|tok     hash: epoch second -> requests or tokens

The invariant the scripts keep, per spend counter: ``spent + held <= limit``, except for cost
that arrives above its hold (``overrun``) or after its hold was freed (``late``); both are
recorded as spend, counted, and reported, never hidden.

Every method takes ``now_ms`` from the caller: the service passes its clock, tests a fake one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from services.budget.limits import RateLimit, SpendLimit
from services.budget.windows import keep_s, window_key
from shared.contracts.budget import HoldState, TokenUsage
from shared.redis_client import bundled_script

RECORD_KEEP_S = 8 * 24 * 3600  # a finished hold is remembered longer than EVENTS keeps the ledger
RATE_KINDS = (("req", "rpm"), ("tok", "tpm"))


@dataclass(frozen=True)
class Bucket:
    """One spend counter a hold is taken on: a limit in the window current at reserve time."""

    key: str
    name: str  # `<scope>:<window key>`, as events and `budget show` name it
    limit_micros: int
    keep_s: int
    alerts: list[tuple[str, int]]

    def as_spec(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "limit": str(self.limit_micros), "keep": self.keep_s,
                "alerts": [[label, str(micros)] for label, micros in self.alerts]}


@dataclass(frozen=True)
class Reservation:
    """What reserve did: `ok` (new hold), `exists` (an earlier hold), or why it refused."""

    outcome: str  # ok | exists | rate | budget | epoch
    state: HoldState = HoldState.HELD
    amount_micros: int = 0
    tool: str | None = None
    expires_at_ms: int | None = None
    max_tokens: int | None = None
    scope: str | None = None  # the refusing scope (rate) or bucket (budget)
    rate_kind: str | None = None
    retry_after_ms: int | None = None
    remaining_micros: int | None = None


@dataclass(frozen=True)
class Settlement:
    """What settle did: `settled`, `dup` (already settled), or `unknown` (no such hold)."""

    outcome: str
    hold_micros: int = 0
    actual_micros: int = 0
    overrun_micros: int = 0
    late: bool = False
    alerts: list[tuple[str, str]] = field(default_factory=list)  # (bucket, threshold label) newly crossed


@dataclass(frozen=True)
class Release:
    """What release did: `released`, `dup` (no longer held), `not_due` or `unknown`."""

    outcome: str
    state: str | None = None
    amount_micros: int = 0


@dataclass(frozen=True)
class Counter:
    """One spend counter as stored."""

    spent: int = 0
    held: int = 0
    overrun: int = 0
    late: int = 0
    by_tool: dict[str, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)


class Accountant:
    """The budget arithmetic of one mesh (one key prefix), atomic per call in Redis."""

    def __init__(self, redis: Redis, prefix: str = "toolbus") -> None:
        self._redis = redis
        self.base = f"{{{prefix}:budget}}"
        self._reserve = redis.register_script(bundled_script("services.budget", "reserve"))
        self._settle = redis.register_script(bundled_script("services.budget", "settle"))
        self._release = redis.register_script(bundled_script("services.budget", "release"))

    @property
    def redis(self) -> Redis:
        return self._redis

    # --- keys --------------------------------------------------------------------------------

    @property
    def epoch_key(self) -> str:
        return f"{self.base}:epoch"

    @property
    def holds_key(self) -> str:
        return f"{self.base}:holds"

    def hold_key(self, call_id: str) -> str:
        return f"{self.base}:hold:{call_id}"

    def spend_key(self, bucket_name: str) -> str:
        return f"{self.base}:spend:{bucket_name}"

    def rate_key(self, scope: str, kind: str) -> str:
        return f"{self.base}:rate:{scope}:{kind}"

    def bucket(self, limit: SpendLimit, now_ms: int) -> Bucket:
        """The counter `limit` charges at `now_ms`."""
        name = f"{limit.scope}:{window_key(limit.window, now_ms)}"
        return Bucket(self.spend_key(name), name, limit.limit_micros, keep_s(limit.window) or 0, limit.thresholds())

    # --- the three operations ----------------------------------------------------------------

    async def reserve(  # one call's whole reservation, each part needed by the script
        self, call_id: str, *, amount_micros: int, tool: str, buckets: list[Bucket], rates: list[RateLimit],
        expires_at_ms: int, max_tokens: int | None, now_ms: int, epoch: str,
    ) -> Reservation:
        """Hold `amount_micros` on every bucket and count the request on every rate, or refuse."""
        rate_specs = [(rate.scope, kind, getattr(rate, attr)) for rate in rates for kind, attr in RATE_KINDS
                      if getattr(rate, attr)]
        spec = {
            "epoch": epoch, "call_id": call_id, "amount": str(amount_micros), "now": now_ms,
            "expires": expires_at_ms, "tool": tool, "max_tokens": -1 if max_tokens is None else max_tokens,
            "keep": RECORD_KEEP_S, "buckets": [b.as_spec() for b in buckets],
            "rates": [{"scope": scope, "kind": kind, "limit": limit} for scope, kind, limit in rate_specs],
        }
        keys = [self.epoch_key, self.hold_key(call_id), self.holds_key, *(b.key for b in buckets),
                *(self.rate_key(scope, kind) for scope, kind, _ in rate_specs)]
        reservation = _reservation(await self._reserve(keys=keys, args=[json.dumps(spec)]))
        if reservation.outcome != "ok":
            return reservation
        return Reservation("ok", HoldState.HELD, amount_micros, tool, expires_at_ms, max_tokens)

    async def settle(self, call_id: str, *, actual_micros: int, tool: str, model: str | None,
                     usage: TokenUsage | None, now_ms: int) -> Settlement:
        """Replace the hold by the actual cost (once)."""
        tokens = 0 if usage is None else usage.input_tokens + usage.output_tokens
        spec = {"call_id": call_id, "actual": str(actual_micros), "tool": tool, "model": model or "",
                "tokens": tokens, "now": now_ms, "keep": RECORD_KEEP_S}
        reply = [_text(part) for part in await self._settle(keys=[self.hold_key(call_id), self.holds_key],
                                                            args=[json.dumps(spec)])]
        if reply[0] == "unknown":
            return Settlement("unknown")
        if reply[0] == "dup":
            return Settlement("dup", int(reply[1]), int(reply[2]), int(reply[3]), reply[4] == "1")
        fired = list(zip(reply[5::2], reply[6::2], strict=True))
        return Settlement("settled", int(reply[1]), int(reply[2]), int(reply[3]), reply[4] == "1", fired)

    async def release(self, call_id: str, *, now_ms: int, expired: bool = False) -> Release:
        """Free the hold (once); with `expired`, only if its expiry has come (the reaper)."""
        state = HoldState.EXPIRED if expired else HoldState.RELEASED
        spec = {"call_id": call_id, "state": state.value, "now": now_ms, "keep": RECORD_KEEP_S}
        reply = [_text(part) for part in await self._release(keys=[self.hold_key(call_id), self.holds_key],
                                                             args=[json.dumps(spec)])]
        amount = int(reply[2]) if len(reply) > 2 else 0  # outcome, state, amount
        return Release(reply[0], reply[1] if len(reply) > 1 else None, amount)

    # --- reading -----------------------------------------------------------------------------

    async def due_holds(self, now_ms: int, limit: int = 500) -> list[str]:
        """Call ids whose holds have expired by `now_ms`, oldest first."""
        due = await self._redis.zrangebyscore(self.holds_key, 0, now_ms, start=0, num=limit)
        return [_text(call_id) for call_id in due]

    async def hold(self, call_id: str) -> dict[str, str]:
        """The stored hold of a call (empty if none)."""
        raw: dict[Any, Any] = await self._redis.hgetall(self.hold_key(call_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def counters(self, bucket_names: list[str]) -> list[Counter]:
        """The stored counters of these buckets (zeros for a bucket never charged)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in bucket_names:
                pipe.hgetall(self.spend_key(name))
            raw: list[dict[Any, Any]] = await pipe.execute()
        return [_counter({_text(k): _text(v) for k, v in fields.items()}) for fields in raw]

    async def epoch(self) -> str | None:
        value = await self._redis.get(self.epoch_key)
        return None if value is None else _text(value)

    async def set_epoch(self, epoch: str) -> None:
        await self._redis.set(self.epoch_key, epoch)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_int(value: str) -> int | None:
    return None if value in ("", "-1") else int(value)


def _reservation(raw: list[Any]) -> Reservation:
    reply = [_text(part) for part in raw]
    outcome = reply[0]
    if outcome == "exists":
        return Reservation("exists", HoldState(reply[1]), int(reply[2]), reply[3], int(reply[4]),
                           _optional_int(reply[5]))
    if outcome == "rate":
        return Reservation("rate", scope=reply[1], rate_kind=reply[2], retry_after_ms=int(reply[3]))
    if outcome == "budget":
        return Reservation("budget", scope=reply[1], remaining_micros=int(reply[2]))
    return Reservation(outcome)


def _counter(fields: dict[str, str]) -> Counter:
    def total(name: str) -> int:
        return int(fields.get(name, 0))

    by_tool = {k.removeprefix("tool:"): int(v) for k, v in fields.items() if k.startswith("tool:")}
    by_model = {k.removeprefix("model:"): int(v) for k, v in fields.items() if k.startswith("model:")}
    return Counter(total("spent"), total("held"), total("overrun"), total("late"), by_tool, by_model)

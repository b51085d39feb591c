"""Per-call state every worker of a pool shares in Redis: claims, attempt history, cancellations.

* **Claim** (`<prefix>:claim:<call_id>`): a worker `SET NX`s it with its own id before running
  a call, and refreshes it while the call runs. A second worker that receives the same call
  (redelivered after an AckWait lapse) sees the claim and backs off instead of running it
  twice. The claim expires `ttl` after its last refresh, so one held by a dead worker frees the
  call for a retry. A finished call's claim becomes `done:<worker>` for a day.
* **Attempts** (`<prefix>:attempts:<call_id>`): one entry per failed attempt, so the dead
  letter carries the history of every worker that tried.
* **Cancellations** (`<prefix>:cancelled:<call_id>`): a cancel that arrives before any worker
  runs the call is remembered here and honoured when the call is reached.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from shared.contracts import Attempt

DONE = "done:"
DAY_S = 24 * 3600

# Compare-and-set on our own claim: refresh or delete it only if we still hold it.
REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class ClaimOutcome(StrEnum):
    """What a worker may do with a call it just received."""

    CLAIMED = "claimed"  # it is ours: run it
    HELD = "held"  # another live worker runs it: back off
    DONE = "done"  # it already finished: acknowledge without running
    CANCELLED = "cancelled"  # the producer cancelled it: answer so, without running


class CallLedger:
    """Claims, attempts and cancellation markers of one mesh (one key prefix)."""

    def __init__(self, redis: Redis, *, prefix: str = "toolbus", claim_ttl_s: float = 10.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = int(claim_ttl_s * 1000)
        self._refresh = redis.register_script(REFRESH)
        self._release = redis.register_script(RELEASE)

    def _key(self, kind: str, call_id: str) -> str:
        return f"{self._prefix}:{kind}:{call_id}"

    async def claim(self, call_id: str, worker: str) -> ClaimOutcome:
        """Try to take the call for `worker` (one round trip: claim, holder and cancel marker)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._key("cancelled", call_id))
            pipe.set(self._key("claim", call_id), worker, nx=True, px=self._ttl_ms)
            pipe.get(self._key("claim", call_id))
            cancelled, claimed, holder = await pipe.execute()
        if cancelled:
            return ClaimOutcome.CANCELLED
        if claimed or holder == worker:
            return ClaimOutcome.CLAIMED
        return ClaimOutcome.DONE if str(holder or "").startswith(DONE) else ClaimOutcome.HELD

    async def refresh(self, call_id: str, worker: str) -> bool:
        """Extend our claim while the call runs; False if it is no longer ours."""
        return bool(await self._refresh(keys=[self._key("claim", call_id)], args=[worker, self._ttl_ms]))

    async def release(self, call_id: str, worker: str) -> None:
        """Give the call up (a transient failure) so its retry can be claimed at once."""
        await self._release(keys=[self._key("claim", call_id)], args=[worker])

    async def complete(self, call_id: str, worker: str) -> None:
        """Mark the call finished: any later delivery is acknowledged without running."""
        await self._redis.set(self._key("claim", call_id), f"{DONE}{worker}", ex=DAY_S)

    async def add_attempt(self, call_id: str, attempt: Attempt) -> None:
        key = self._key("attempts", call_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, attempt.model_dump_json())
            pipe.expire(key, DAY_S)
            await pipe.execute()

    async def attempts(self, call_id: str) -> list[Attempt]:
        """Every failed attempt recorded for the call, oldest first."""
        raw: list[Any] = await self._redis.lrange(self._key("attempts", call_id), 0, -1)
        return [Attempt.model_validate_json(item) for item in raw]

    async def cancel(self, call_id: str) -> None:
        """Remember that the producer cancelled the call (for a day)."""
        await self._redis.set(self._key("cancelled", call_id), "1", ex=DAY_S)

    async def begin_replay(self, call_id: str, replay_id: str) -> bool:
        """True the first time a DLQ replay is seen: the caller then resets the call's state."""
        return bool(await self._redis.set(self._key(f"replay:{replay_id}", call_id), "1", nx=True, ex=DAY_S))

    async def forget(self, call_id: str) -> None:
        """Drop the call's claim, attempts and cancel marker (a DLQ replay starts afresh)."""
        await self._redis.delete(*(self._key(kind, call_id) for kind in ("claim", "attempts", "cancelled")))

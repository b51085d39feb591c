"""A circuit breaker per backend whose state lives in Redis, shared by every worker of a pool.

pybreaker's state machine and storage semantics, on asyncio Redis (pybreaker's
``CircuitRedisStorage`` needs the blocking client and pybreaker has no asyncio API)::

             record_failure, fail_max consecutive times
     CLOSED ─────────────────────────────────────────────▶ OPEN ◀─────────┐
       ▲                                                     │            │
       │                                  before_call once   │            │ record_failure
       │                                  reset_s elapsed    │            │ (the trial failed)
       │  record_success                  (one winner in     ▼            │
       │  (the trial, or any success)      the whole pool)  HALF_OPEN ────┘
       └──────────────────────────────────────────────────────┘

* CLOSED: calls pass; each failure counts, any success resets the count to 0.
* OPEN: calls fail fast with ``CircuitOpen`` (-32050) and ``retry_after_ms``; failures of
  calls that were already running ("stragglers") change nothing.
* HALF_OPEN: exactly one trial call is allowed (the caller whose ``token`` won the
  OPEN → HALF_OPEN step); everyone else is refused until the trial ends. A trial that stays
  unresolved for ``reset_s`` (its worker died) is handed to the next caller.

Storage: one Redis hash per (pool, backend) at ``<prefix>:breaker:<pool>:<backend>`` with the
fields ``state``, ``failures``, ``opened_at``, ``trial_token`` and ``trial_at`` (times are epoch
seconds written exactly as Python's ``repr(float)``). A missing hash means CLOSED with no failures,
so first use and a Redis that lost its data both start closed. Every write refreshes an expiry of
``max(10 * reset_s, 1 h)`` so abandoned backends do not leave keys behind forever.

Every state change is one Lua script, so it is atomic across all processes: when twenty workers
race for the half-open trial exactly one wins, and the CLOSED → OPEN step is seen (and reported
as an event) by exactly one of them. The scripts get the current time as an argument from a
Python clock instead of Redis ``TIME``: tests can drive time, and the time base is the same one
the caller uses for ``retry_after_ms``.

Redis errors never reach the caller. The breaker is a protection, not a dependency: if Redis
is unreachable, refusing every call would turn a Redis outage into an outage of every backend,
so ``before_call`` logs a warning and lets the call through (fail open) and ``record_*`` log
and return None. The caller builds the Redis client and should give it short socket timeouts
(a fraction of a second) so a dead Redis costs each call little.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from shared.config import BreakerConfig
from shared.errors import CircuitOpen

__all__ = ["BreakerSnapshot", "BreakerState", "SharedBreaker", "Transition"]

log = structlog.get_logger(__name__)

MIN_EXPIRY_S = 3600  # an hour: long enough that no live breaker ever loses its state to expiry
EXPIRY_RESETS = 10  # ... and at least ten reset periods for breakers with long resets


class BreakerState(StrEnum):
    """The three states of the breaker, stored verbatim in the hash's ``state`` field."""

    CLOSED = "closed"  # calls pass; consecutive failures are counted
    OPEN = "open"  # calls fail fast until reset_s has passed since opened_at
    HALF_OPEN = "half_open"  # one trial call runs; its outcome closes or re-opens the breaker


@dataclass(frozen=True)
class Transition:
    """A state change the caller reports as a ``breaker.<new>`` event."""

    backend: str
    old: BreakerState
    new: BreakerState
    failures: int


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker as ``toolbus status`` shows it."""

    backend: str
    state: BreakerState
    failures: int  # consecutive failures counted so far
    opened_at: float | None  # epoch seconds of the last CLOSED/HALF_OPEN -> OPEN step
    retry_after_ms: int  # 0 unless open


# Shared by every script: read the hash, treating a missing hash (or a state this code does not
# know) as CLOSED so a Redis that lost its data, or holds garbage, never wedges a backend.
_READ_STATE = """
local f = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'trial_token', 'trial_at')
local state = f[1]
if state ~= 'open' and state ~= 'half_open' then state = 'closed' end
local failures = tonumber(f[2]) or 0
"""

# Replies are {verdict, old state, new state, failures, time stamp}. Times travel as the strings
# they were stored as: a Lua number would be truncated to an integer in the reply, and a
# false/nil inside a Lua table would cut the reply short, hence the `or ''` / `or '0'`.

# KEYS[1] hash; ARGV: now, reset_s, token, expiry_s.
# Verdicts: allow; refuse (stamp = opened_at or trial_at, the retry is reset_s after it);
# takeover (this token replaced a trial that outlived reset_s).
_BEFORE_CALL = _READ_STATE + """
local now, reset_s = tonumber(ARGV[1]), tonumber(ARGV[2])
if state == 'open' then
  local opened_at = f[3] or '0'
  if now < (tonumber(opened_at) or 0) + reset_s then
    return {'refuse', state, state, failures, opened_at}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'trial_token', ARGV[3], 'trial_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'allow', state, 'half_open', failures, ARGV[1]}
end
if state == 'half_open' then
  if f[4] == ARGV[3] then
    return {'allow', state, state, failures, f[5] or '0'}
  end
  local trial_at = f[5] or '0'
  if now < (tonumber(trial_at) or 0) + reset_s then
    return {'refuse', state, state, failures, trial_at}
  end
  redis.call('HSET', KEYS[1], 'trial_token', ARGV[3], 'trial_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'takeover', state, state, failures, ARGV[1]}
end
return {'allow', state, state, failures, ''}
"""

# KEYS[1] hash; ARGV: expiry_s. Any success while half-open closes (pybreaker does the same):
# the backend answered, which is what the trial wanted to learn. A success while open is a
# straggler from before the breaker opened and changes nothing.
_RECORD_SUCCESS = _READ_STATE + """
if state == 'half_open' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('HDEL', KEYS[1], 'opened_at', 'trial_token', 'trial_at')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return {'ok', state, 'closed', 0, ''}
end
if state == 'closed' and failures > 0 then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  failures = 0
end
return {'ok', state, state, failures, ''}
"""

# KEYS[1] hash; ARGV: now, fail_max, expiry_s. A failure while open is a straggler: no change.
_RECORD_FAILURE = _READ_STATE + """
if state == 'open' then
  return {'ok', state, state, failures, f[3] or '0'}
end
failures = failures + 1
if state == 'half_open' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'failures', failures, 'opened_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'trial_token', 'trial_at')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'ok', state, 'open', failures, ARGV[1]}
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', failures)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'ok', state, state, failures, ''}
"""


def _text(value: object) -> str:
    """A reply element as str, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(raw: str) -> BreakerState:
    """A stored state; like the scripts, anything unknown (or absent) counts as closed."""
    try:
        return BreakerState(raw)
    except ValueError:
        return BreakerState.CLOSED


def _ms_until(deadline: float, now: float) -> int:
    """Whole milliseconds from ``now`` to ``deadline``, rounded up so a retry is never early."""
    return math.ceil((deadline - now) * 1000)


@dataclass(frozen=True)
class _Reply:
    """One script's answer (see the reply layout above the scripts)."""

    verdict: str
    old: BreakerState
    new: BreakerState
    failures: int
    stamp: float | None

    @classmethod
    def parse(cls, raw: Any) -> _Reply:
        verdict, old, new, failures, stamp = (_text(item) for item in raw)
        return cls(verdict, BreakerState(old), BreakerState(new), int(failures), float(stamp) if stamp else None)


class SharedBreaker:
    """The breaker of one backend in one pool; every worker builds one on the same Redis key.

    ``token`` identifies a call (its call id, say): the caller that wins the half-open trial
    must pass the same token to ``before_call`` again if it retries the check, and reports the
    trial's outcome with ``record_success`` / ``record_failure``.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        pool: str,
        backend: str,
        config: BreakerConfig,
        key_prefix: str = "toolbus",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.config = config
        self.key = f"{key_prefix}:breaker:{pool}:{backend}"
        self._redis = redis
        self._clock = clock
        self._expiry_s = math.ceil(max(EXPIRY_RESETS * config.reset_s, MIN_EXPIRY_S))
        # Script objects run EVALSHA and re-load the script on NOSCRIPT (after a Redis restart).
        self._before_call = redis.register_script(_BEFORE_CALL)
        self._record_success = redis.register_script(_RECORD_SUCCESS)
        self._record_failure = redis.register_script(_RECORD_FAILURE)

    async def before_call(self, token: str) -> Transition | None:
        """Allow the call (None, or the OPEN → HALF_OPEN transition it caused) or raise CircuitOpen."""
        now = self._clock()
        args = (repr(float(now)), repr(float(self.config.reset_s)), token, self._expiry_s)
        reply = await self._run("before_call", self._before_call, token, *args)
        if reply is None:  # Redis unreachable: fail open
            return None
        if reply.verdict == "refuse":
            raise self._refusal(reply, now)
        if reply.verdict == "takeover":
            log.info("breaker.trial_taken_over", pool=self.pool, backend=self.backend, token=token)
        return self._transition(reply)

    async def record_success(self, token: str) -> Transition | None:
        """Count a success: resets the failure count, or closes a half-open breaker."""
        reply = await self._run("record_success", self._record_success, token, self._expiry_s)
        return None if reply is None else self._transition(reply)

    async def record_failure(self, token: str) -> Transition | None:
        """Count a failure: opens the breaker at fail_max, or re-opens it when the trial failed."""
        args = (repr(float(self._clock())), self.config.fail_max, self._expiry_s)
        reply = await self._run("record_failure", self._record_failure, token, *args)
        return None if reply is None else self._transition(reply)

    async def snapshot(self) -> BreakerSnapshot:
        """The current state as stored (raises RedisError: a status page should say Redis is down)."""
        fields = {_text(name): _text(value) for name, value in (await self._redis.hgetall(self.key)).items()}
        state = _state(fields.get("state", ""))
        opened_at = float(fields["opened_at"]) if "opened_at" in fields else None
        retry_after_ms = 0
        if state is BreakerState.OPEN and opened_at is not None:
            retry_after_ms = max(0, _ms_until(opened_at + self.config.reset_s, self._clock()))
        failures = int(fields.get("failures", "0"))
        return BreakerSnapshot(self.backend, state, failures, opened_at, retry_after_ms)

    async def _run(self, operation: str, script: AsyncScript, token: str, *args: str | int) -> _Reply | None:
        """Run one script on this breaker's key; None (and a warning) if Redis failed."""
        try:
            raw = await script(keys=[self.key], args=args)
        except (RedisError, OSError) as error:
            log.warning(
                "breaker.redis_unavailable", pool=self.pool, backend=self.backend, operation=operation,
                token=token, error=f"{type(error).__name__}: {error}",
            )  # fmt: skip
            return None
        return _Reply.parse(raw)

    def _refusal(self, reply: _Reply, now: float) -> CircuitOpen:
        """The CircuitOpen for a refused call: retry once reset_s has passed since the stamp."""
        since = reply.stamp if reply.stamp is not None else now
        retry_after_ms = max(1, _ms_until(since + self.config.reset_s, now))
        return CircuitOpen(f"circuit open for backend {self.backend!r}", retry_after_ms=retry_after_ms,
                           backend=self.backend)

    def _transition(self, reply: _Reply) -> Transition | None:
        """The state change a script made, if it made one."""
        if reply.old is reply.new:
            return None
        return Transition(self.backend, reply.old, reply.new, reply.failures)

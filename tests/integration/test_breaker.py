"""The shared circuit breaker against a real redis-server: several workers, one state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest
import pytest_asyncio
import structlog.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.executor import breaker as breaker_module
from services.executor.breaker import BreakerSnapshot, BreakerState, SharedBreaker, Transition
from shared.config import BreakerConfig
from shared.embedded import RedisServer, RedisServerSettings
from shared.errors import CircuitOpen
from shared.mesh import free_port

pytestmark = [pytest.mark.integration]

START = 1_700_000_000.0  # a realistic epoch; plus multiples of 1/1024 s it stays exact in a double
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Workers = Callable[..., list[SharedBreaker]]


@pytest_asyncio.fixture
async def workers(redis_server: RedisServer) -> AsyncIterator[Workers]:
    """Builds `n` breakers on one fresh key, each with its own Redis client, as separate workers have.

    Every other client decodes responses, so both reply types (bytes and str) are exercised.
    """
    clients: list[Redis] = []

    def build(n: int, clock: Clock, *, fail_max: int = 3, reset_s: float = 10.0) -> list[SharedBreaker]:
        prefix = f"t{uuid4().hex}"
        config = BreakerConfig(fail_max=fail_max, reset_s=reset_s)
        breakers = []
        for index in range(n):
            client = Redis.from_url(redis_server.url, decode_responses=index % 2 == 1)
            clients.append(client)
            breakers.append(SharedBreaker(client, pool="default", backend="demo", config=config,
                                          key_prefix=prefix, clock=clock))
        return breakers

    yield build
    for client in clients:
        await client.aclose()


async def open_breaker(breaker: SharedBreaker) -> None:
    """Record fail_max failures so the breaker opens at the clock's current time."""
    for n in range(breaker.config.fail_max):
        await breaker.record_failure(f"failing-{n}")
    assert (await breaker.snapshot()).state is OPEN


def refusal(outcome: Transition | BaseException | None) -> CircuitOpen:
    """The CircuitOpen an outcome of asyncio.gather(return_exceptions=True) must be."""
    assert isinstance(outcome, CircuitOpen), outcome
    return outcome


async def test_opens_after_fail_max_consecutive_failures_from_different_workers(workers: Workers) -> None:
    """Failures recorded by different workers add up; the one reaching fail_max alone reports closed→open."""
    breakers = workers(4, Clock(), fail_max=5)
    early = [await breakers[n % 4].record_failure(f"call-{n}") for n in range(4)]
    assert early == [None] * 4
    assert (await breakers[0].snapshot()).state is CLOSED

    # Eight more failures race in; exactly one of them is the fifth.
    racing = await asyncio.gather(*(breakers[n % 4].record_failure(f"late-{n}") for n in range(8)))
    transitions = [t for t in racing if t is not None]
    assert transitions == [Transition("demo", CLOSED, OPEN, 5)]
    snapshot = await breakers[3].snapshot()
    assert snapshot.state is OPEN and snapshot.failures == 5


async def test_a_success_resets_the_consecutive_failure_count(workers: Workers) -> None:
    """fail_max-1 failures, a success and fail_max-1 more failures leave the breaker closed."""
    first, second = workers(2, Clock(), fail_max=3)
    for n in range(2):
        assert await first.record_failure(f"a-{n}") is None
    assert await second.record_success("ok") is None
    assert (await first.snapshot()).failures == 0
    for n in range(2):
        assert await second.record_failure(f"b-{n}") is None
    snapshot = await first.snapshot()
    assert (snapshot.state, snapshot.failures) == (CLOSED, 2)


async def test_open_refuses_with_circuit_open_and_a_shrinking_retry_after(workers: Workers) -> None:
    """An open breaker raises CircuitOpen (-32050) whose retry_after_ms counts down to reset_s after opening."""
    clock = Clock()
    opener, other = workers(2, clock, reset_s=10.0)
    await open_breaker(opener)
    waits = []
    for step in (0.0, 2.5, 7.0, 0.4999):
        clock.advance(step)
        with pytest.raises(CircuitOpen) as refused:
            await other.before_call(f"call-{step}")
        assert refused.value.code == -32050
        error = refused.value.to_jsonrpc("c1")
        assert error["data"]["reason"] == "circuit_open" and error["data"]["backend"] == "demo"
        waits.append(refused.value.data["retry_after_ms"])
    assert waits == [10_000, 7_500, 500, 1]


async def test_exactly_one_of_many_concurrent_callers_gets_the_half_open_trial(workers: Workers) -> None:
    """Once reset_s has passed, of 20 concurrent callers on 4 workers exactly one is allowed, as open→half_open."""
    clock = Clock()
    breakers = workers(4, clock, fail_max=2, reset_s=5.0)
    await open_breaker(breakers[0])
    clock.advance(5.0)
    outcomes = await asyncio.gather(
        *(breakers[n % 4].before_call(f"call-{n}") for n in range(20)), return_exceptions=True
    )
    winners = [n for n, outcome in enumerate(outcomes) if not isinstance(outcome, BaseException)]
    assert len(winners) == 1
    assert outcomes[winners[0]] == Transition("demo", OPEN, HALF_OPEN, 2)
    assert all(refusal(outcomes[n]).data["retry_after_ms"] == 5_000 for n in range(20) if n not in winners)
    # The winner asking again with its token is still allowed, and no longer a transition.
    assert await breakers[winners[0] % 4].before_call(f"call-{winners[0]}") is None


async def test_a_successful_trial_closes_the_breaker(workers: Workers) -> None:
    """A success while half-open moves it to closed with no failures, reported as half_open→closed."""
    clock = Clock()
    trial_worker, other = workers(2, clock)
    await open_breaker(other)
    clock.advance(10.0)
    assert await trial_worker.before_call("trial") == Transition("demo", OPEN, HALF_OPEN, 3)
    assert await trial_worker.record_success("trial") == Transition("demo", HALF_OPEN, CLOSED, 0)
    assert await other.before_call("next") is None
    assert await other.snapshot() == BreakerSnapshot("demo", CLOSED, 0, None, 0)


async def test_a_failed_trial_reopens_the_breaker_from_the_time_of_the_failure(workers: Workers) -> None:
    """A failure while half-open re-opens the breaker with opened_at set to now, so the full reset_s applies again."""
    clock = Clock()
    trial_worker, other = workers(2, clock, reset_s=10.0)
    await open_breaker(other)
    clock.advance(12.0)
    assert await trial_worker.before_call("trial") is not None
    clock.advance(3.0)
    assert await trial_worker.record_failure("trial") == Transition("demo", HALF_OPEN, OPEN, 4)
    snapshot = await other.snapshot()
    assert (snapshot.state, snapshot.opened_at, snapshot.retry_after_ms) == (OPEN, START + 15.0, 10_000)
    with pytest.raises(CircuitOpen) as refused:
        await other.before_call("next")
    assert refused.value.data["retry_after_ms"] == 10_000


async def test_an_abandoned_trial_is_taken_over_after_reset_s(workers: Workers) -> None:
    """A trial with no outcome for reset_s (its worker died) goes to the next caller, and the old token loses it."""
    clock = Clock()
    vanished, survivor = workers(2, clock, reset_s=4.0)
    await open_breaker(survivor)
    clock.advance(4.0)
    assert await vanished.before_call("lost-trial") is not None
    clock.advance(3.0)
    with pytest.raises(CircuitOpen) as refused:
        await survivor.before_call("new-trial")
    assert refused.value.data["retry_after_ms"] == 1_000
    clock.advance(1.0)
    assert await survivor.before_call("new-trial") is None  # taken over: allowed, still half-open
    assert (await survivor.snapshot()).state is HALF_OPEN
    with pytest.raises(CircuitOpen):
        await vanished.before_call("lost-trial")
    assert await survivor.record_success("new-trial") == Transition("demo", HALF_OPEN, CLOSED, 0)


async def test_snapshot_reflects_each_state(workers: Workers) -> None:
    """snapshot() shows closed (also for a missing hash), open with its countdown, half-open and closed again."""
    clock = Clock()
    (breaker,) = workers(1, clock, fail_max=2, reset_s=6.0)
    assert await breaker.snapshot() == BreakerSnapshot("demo", CLOSED, 0, None, 0)
    await breaker.record_failure("a")
    assert await breaker.snapshot() == BreakerSnapshot("demo", CLOSED, 1, None, 0)
    await breaker.record_failure("b")
    assert await breaker.snapshot() == BreakerSnapshot("demo", OPEN, 2, START, 6_000)
    clock.advance(2.0)
    assert await breaker.snapshot() == BreakerSnapshot("demo", OPEN, 2, START, 4_000)
    clock.advance(4.0)
    await breaker.before_call("trial")
    assert await breaker.snapshot() == BreakerSnapshot("demo", HALF_OPEN, 2, START, 0)
    await breaker.record_success("trial")
    assert await breaker.snapshot() == BreakerSnapshot("demo", CLOSED, 0, None, 0)


async def test_a_lost_hash_means_closed_and_writes_keep_an_expiry(workers: Workers, redis_server: RedisServer) -> None:
    """Every write leaves the hash with an expiry of at least an hour, and a hash Redis lost reads as closed."""
    (breaker,) = workers(1, Clock(), reset_s=1_000.0)
    await open_breaker(breaker)
    async with Redis.from_url(redis_server.url) as client:
        assert 3_600 < await client.ttl(breaker.key) <= 10_000
        await client.delete(breaker.key)
    assert await breaker.before_call("after-loss") is None
    assert await breaker.snapshot() == BreakerSnapshot("demo", CLOSED, 0, None, 0)


async def test_fails_open_when_redis_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing listening on the Redis port, before_call lets calls through and record_* return None, logging."""
    captured = structlog.testing.CapturingLogger()
    monkeypatch.setattr(breaker_module, "log", captured)
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2) as client:
        breaker = SharedBreaker(client, pool="default", backend="demo", config=BreakerConfig(fail_max=1),
                                key_prefix=f"t{uuid4().hex}", clock=Clock())
        assert await breaker.before_call("call") is None
        assert await breaker.record_failure("call") is None
        assert await breaker.record_success("call") is None
        assert await breaker.before_call("call") is None
    events = [call.args[0] for call in captured.calls if call.method_name == "warning"]
    assert events == ["breaker.redis_unavailable"] * 4


async def test_state_survives_a_redis_restart_and_the_scripts_are_reloaded(tmp_path: Path) -> None:
    """After Redis restarts (empty script cache, data from its append-only file) the open breaker still refuses.

    `from_url` clients do not retry by default, so the first command on a connection the restart
    closed would fail (and the breaker fail open); one retry reconnects transparently.
    """
    clock = Clock()
    with RedisServer(RedisServerSettings(data_dir=tmp_path)) as server:
        async with Redis.from_url(server.url, socket_timeout=2, retry=Retry(NoBackoff(), 1)) as client:
            breaker = SharedBreaker(client, pool="default", backend="demo", config=BreakerConfig(fail_max=1),
                                    key_prefix=f"t{uuid4().hex}", clock=clock)
            await open_breaker(breaker)
            await asyncio.to_thread(server.restart)
            with pytest.raises(CircuitOpen):
                await breaker.before_call("after-restart")
            clock.advance(30.0)
            assert await breaker.before_call("trial") == Transition("demo", OPEN, HALF_OPEN, 1)


# --------------------------------------------------------------------------- property test

TICK_S = 1 / 1024  # a binary fraction: START + ticks * TICK_S is exact, so model and breaker agree to the ms


@dataclass
class Model:
    """The breaker's state machine in plain Python for a single caller, with time in ticks."""

    fail_max: int
    reset_ticks: int
    state: BreakerState = CLOSED
    failures: int = 0
    opened_at: int | None = None
    trial_token: str | None = None
    trial_at: int = 0

    def _move(self, new: BreakerState) -> Transition:
        old, self.state = self.state, new
        return Transition("demo", old, new, self.failures)

    def before_call(self, now: int, token: str) -> Transition | int | None:
        """None or a Transition when allowed, else the refusal's retry_after_ms."""
        if self.state is OPEN:
            assert self.opened_at is not None
            if now < self.opened_at + self.reset_ticks:
                return max(1, ms(self.opened_at + self.reset_ticks - now))
            self.trial_token, self.trial_at = token, now
            return self._move(HALF_OPEN)
        if self.state is HALF_OPEN and token != self.trial_token:
            if now < self.trial_at + self.reset_ticks:
                return max(1, ms(self.trial_at + self.reset_ticks - now))
            self.trial_token, self.trial_at = token, now
        return None

    def record_success(self) -> Transition | None:
        if self.state is HALF_OPEN:
            self.failures, self.opened_at = 0, None
            return self._move(CLOSED)
        if self.state is CLOSED:
            self.failures = 0
        return None

    def record_failure(self, now: int) -> Transition | None:
        if self.state is OPEN:
            return None
        self.failures += 1
        if self.state is HALF_OPEN or self.failures >= self.fail_max:
            self.opened_at = now
            return self._move(OPEN)
        return None

    def snapshot(self, now: int) -> BreakerSnapshot:
        opened_at = None if self.opened_at is None else START + self.opened_at * TICK_S
        retry = ms(self.opened_at + self.reset_ticks - now) if self.state is OPEN and self.opened_at is not None else 0
        return BreakerSnapshot("demo", self.state, self.failures, opened_at, max(0, retry))


def ms(ticks: int) -> int:
    """Ticks as whole milliseconds, rounded up so a retry is never early."""
    return -(-ticks * 1000 // 1024)


async def outcome_of(breaker: SharedBreaker, token: str) -> Transition | int | None:
    """before_call's result in the model's terms: the refusal's retry_after_ms instead of an exception."""
    try:
        return await breaker.before_call(token)
    except CircuitOpen as refused:
        retry_after_ms: int = refused.data["retry_after_ms"]
        return retry_after_ms


operations = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(["a", "b"])),
        st.tuples(st.sampled_from(["success", "failure"]), st.just("a")),
        # Steps on and next to the reset periods (512 and 1024 ticks) find the boundaries.
        st.tuples(st.just("advance"), st.sampled_from([0, 1, 511, 512, 1023, 1024]) | st.integers(0, 1_500)),
    ),
    max_size=25,
)
TAKEOVER: list[tuple[str, str | int]] = [
    ("failure", "a"), ("advance", 512), ("call", "a"), ("advance", 511), ("call", "b"), ("advance", 1),
    ("call", "b"), ("call", "a"), ("failure", "a"), ("advance", 512), ("call", "a"), ("success", "a"),
]


@settings(max_examples=40, deadline=None)
@example(ops=TAKEOVER, fail_max=1, reset_ticks=512)
@given(ops=operations, fail_max=st.integers(1, 3), reset_ticks=st.sampled_from([512, 1024]))
async def test_the_breaker_matches_a_reference_model(
    redis_server: RedisServer, ops: list[tuple[str, str | int]], fail_max: int, reset_ticks: int
) -> None:
    """For any sequence of calls, outcomes and clock steps the breaker answers and stores what the model does."""
    model = Model(fail_max, reset_ticks)
    now = 0
    clock = Clock()
    async with Redis.from_url(redis_server.url) as client:
        breaker = SharedBreaker(client, pool="default", backend="demo", key_prefix=f"t{uuid4().hex}", clock=clock,
                                config=BreakerConfig(fail_max=fail_max, reset_s=reset_ticks * TICK_S))
        for op, value in ops:
            if op == "advance":
                assert isinstance(value, int)
                now += value
                clock.now = START + now * TICK_S
            elif op == "call":
                assert await outcome_of(breaker, str(value)) == model.before_call(now, str(value))
            elif op == "success":
                assert await breaker.record_success(str(value)) == model.record_success()
            else:
                assert await breaker.record_failure(str(value)) == model.record_failure(now)
            assert await breaker.snapshot() == model.snapshot(now), (op, value)

"""The budget accountant's domain layer against a real redis-server, with a clock the test moves.

Rate windows, day windows, alerts, concurrent first use of a principal, idempotent settle and
release (a property test against a plain-Python model), the ledger rebuilding the counters,
failing closed, and the reaper. Ledger events are collected in a list, except in the last
section, which publishes them to a real EVENTS stream and reads them back as a rebuild does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import nats
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from redis.asyncio import Redis

from services.budget.accountant import Accountant, Counter
from services.budget.ledger import LEDGER_KINDS, fold, read_ledger, write_folded
from services.budget.limits import LimitBook
from services.budget.operations import Books, BudgetOperations, Emit, new_epoch
from shared import outcomes as outcomes_module
from shared.bus import provision_streams
from shared.config import Config, parse_config
from shared.contracts import (
    Event,
    EventKind,
    HoldState,
    LedgerReply,
    Refusal,
    RefusalReason,
    ReleaseRequest,
    ReserveReply,
    ReserveRequest,
    SettleRequest,
    StatusRequest,
)
from shared.contracts.budget import TokenUsage
from shared.embedded import NatsServer, RedisServer
from shared.mesh import free_port
from shared.outcomes import Outcomes
from shared.redis_client import redis_client
from shared.subjects import Subjects

pytestmark = [pytest.mark.integration]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CENT = 10_000  # micro-USD
START_WITHIN_MS = 1_000  # every test call must start within a second …
RUN_MS = 1_000  # … and may run for a second; with the 5 s settle margin its hold expires 7 s after reserve
HOLD_LIFE_MS = START_WITHIN_MS + RUN_MS + 5_000


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, milli: int = 0) -> int:
    """Epoch milliseconds of a UTC moment."""
    moment = datetime(year, month, day, hour, minute, second, milli * 1000, tzinfo=UTC)
    return (moment - EPOCH) // timedelta(milliseconds=1)


NOON = ms(2026, 11, 21, 12)  # on a whole second, so rate windows line up with the test's steps


class Clock:
    """Epoch milliseconds the test moves by hand."""

    def __init__(self, now: int = NOON) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, milliseconds: int) -> None:
        self.now += milliseconds


@dataclass
class Ledger:
    """Stands in for the EVENTS stream: every emitted event, in order."""

    clock: Clock
    events: list[Event] = field(default_factory=list)

    async def emit(self, *kinds: EventKind, **fields: Any) -> None:
        fields.pop("dedupe", None)  # a message-id suffix for the real stream, not part of the event
        self.events.extend(Event(kind=kind, ts_ms=self.clock(), source="test", **fields) for kind in kinds)

    def of(self, kind: EventKind) -> list[Event]:
        return [event for event in self.events if event.kind is kind]


@dataclass
class Budget:
    """One accountant on a fresh key prefix, its operations, clock and collected ledger."""

    ops: BudgetOperations
    clock: Clock
    ledger: Ledger

    @property
    def accountant(self) -> Accountant:
        return self.ops.accountant

    async def reserve(self, call_id: str, scopes: list[str], *tools: str) -> ReserveReply:
        return await self.ops.reserve(request(call_id, scopes, self.clock(), *tools))

    async def settle(self, call_id: str, tool: str, tokens: int | None = None) -> LedgerReply:
        usage = None if tokens is None else TokenUsage(model="m1", input_tokens=tokens)
        return await self.ops.settle(SettleRequest(call_id=call_id, tool=tool, usage=usage))

    async def release(self, call_id: str) -> LedgerReply:
        return await self.ops.release(ReleaseRequest(call_id=call_id, reason="failed"))

    async def counter(self, bucket: str) -> Counter:
        [counter] = await self.accountant.counters([bucket])
        return counter


def request(call_id: str, scopes: list[str], now: int, *tools: str) -> ReserveRequest:
    return ReserveRequest(call_id=call_id, principal="tester", scopes=scopes, tools=list(tools) or ["flat"],
                          start_by_ms=now + START_WITHIN_MS, run_ms=RUN_MS)


def budget_config(*budgets: dict[str, Any]) -> Config:
    """Prices shared by the tests: a flat $0.01 tool, a $0.10 one, and token-priced ones (1 micro-USD a token):
    `llm` holds 100 tokens, `tight` holds its $0.01 price and so affords 0 tokens."""
    return parse_config({
        "tools": {
            "flat": {"cost_usd": "0.01"},
            "dime": {"cost_usd": "0.10"},
            "llm": {"model": "m1", "max_tokens": 100},
            "tight": {"cost_usd": "0.01", "max_cost_usd": "0.01", "model": "m1"},
        },
        "models": {"m1": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 1}},
        "budgets": list(budgets),
    }, source="<accountant tests>")


async def open_budget(client: Redis, config: Config, clock: Clock) -> Budget:
    """Operations on a key prefix no other test uses, with the epoch agreed between Redis and the books."""
    accountant = Accountant(client, f"t{uuid4().hex[:10]}")
    epoch = new_epoch()
    await accountant.set_epoch(epoch)
    ledger = Ledger(clock)
    books = Books(config, LimitBook(config.budgets, []), epoch=epoch)
    return Budget(BudgetOperations(accountant, books, ledger.emit, clock), clock, ledger)


@pytest_asyncio.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url)
    yield client
    await client.aclose()


def refusal_of(reply: ReserveReply) -> Refusal:
    assert reply.refusal is not None, reply
    assert reply.hold is None
    return reply.refusal


# --------------------------------------------------------------------------- rate limits


async def test_requests_per_minute_grant_exactly_rpm_and_refuse_the_rest_with_retry_after(redis: Redis) -> None:
    """700 reserves 85 ms apart against rpm 600: the first 600 are held, the last 100 refused rate_limited
    with retry_after_ms counting down to the moment the minute's first second leaves the window."""
    budget = await open_budget(redis, budget_config({"scope": "key:k", "rpm": 600}), Clock())
    replies = []
    for n in range(700):
        replies.append(await budget.reserve(f"c{n}", ["key:k"]))
        budget.clock.advance(85)
    assert all(reply.hold is not None and reply.refusal is None for reply in replies[:600])
    refusals = [refusal_of(reply) for reply in replies[600:]]
    assert {(r.reason, r.scope) for r in refusals} == {(RefusalReason.RATE_LIMITED, "key:k")}
    assert all(r.retry_after_ms is not None and 0 < r.retry_after_ms <= 60_000 for r in refusals)
    # The 12 requests of the window's first second (0…935 ms) leave it 60 s after that second began.
    assert [r.retry_after_ms for r in refusals] == [60_000 - n * 85 for n in range(600, 700)]
    assert len(budget.ledger.of(EventKind.BUDGET_RESERVED)) == 600
    assert len(budget.ledger.of(EventKind.BUDGET_EXCEEDED)) == 100


async def test_a_rate_window_admits_again_as_its_oldest_second_leaves_it(redis: Redis) -> None:
    """After a full minute, 1 ms before the first second leaves the window is still refused; then exactly
    that second's 12 requests are admitted again, and two minutes on the whole rpm is free."""
    budget = await open_budget(redis, budget_config({"scope": "key:k", "rpm": 600}), Clock())
    for n in range(600):
        assert (await budget.reserve(f"c{n}", ["key:k"])).hold is not None
        budget.clock.advance(85)
    budget.clock.now = NOON + 60_000 - 1
    assert refusal_of(await budget.reserve("early", ["key:k"])).retry_after_ms == 1
    budget.clock.now = NOON + 60_000
    again = [await budget.reserve(f"again{n}", ["key:k"]) for n in range(13)]
    assert [reply.hold is not None for reply in again] == [True] * 12 + [False]
    assert refusal_of(again[-1]).reason is RefusalReason.RATE_LIMITED
    budget.clock.now = NOON + 180_000
    assert all([(await budget.reserve(f"later{n}", ["key:k"])).hold is not None for n in range(600)])


# --------------------------------------------------------------------------- windows


async def test_a_call_reserved_before_midnight_is_charged_to_the_day_it_was_reserved_in(redis: Redis) -> None:
    """Reserved at 23:59:59.999 and settled at 00:00:00.500 UTC, the cost lands in the reserve day's counter;
    the new day's counter stays untouched and status after midnight shows the new day with nothing spent."""
    clock = Clock(ms(2026, 11, 21, 23, 59, 59, 999))
    budget = await open_budget(redis, budget_config({"scope": "user:x", "limit_usd": 1, "window": "day"}), clock)
    assert (await budget.reserve("late-night", ["user:x"])).hold is not None
    assert [e.buckets for e in budget.ledger.of(EventKind.BUDGET_RESERVED)] == [["user:x:d20261121"]]

    clock.now = ms(2026, 11, 22, 0, 0, 0, 500)
    settled = await budget.settle("late-night", "flat")
    assert (settled.changed, settled.actual_micros, settled.late) == (True, CENT, False)
    old, new = await budget.accountant.counters(["user:x:d20261121", "user:x:d20261122"])
    assert old == Counter(spent=CENT, held=0, by_tool={"flat": CENT})
    assert new == Counter()

    [shown] = (await budget.ops.status(StatusRequest(scope="user:x"))).budgets
    assert (shown.window, shown.window_key, shown.resets_at_ms) == ("day", "d20261122", ms(2026, 11, 23))
    assert (shown.spent_micros, shown.held_micros, shown.remaining_micros) == (0, 0, 100 * CENT)


# --------------------------------------------------------------------------- alerts


def alerts_of(ledger: Ledger) -> list[tuple[Any, Any]]:
    return [(e.detail["bucket"], e.detail["threshold"]) for e in ledger.of(EventKind.BUDGET_ALERT)]


async def spend(budget: Budget, scope: str, tool: str, count: int) -> list[list[tuple[Any, Any]]]:
    """Reserve and settle `count` calls one after another; the alerts each settle emitted."""
    fired = []
    for _ in range(count):
        call_id = uuid4().hex
        assert (await budget.reserve(call_id, [scope], tool)).hold is not None
        before = len(alerts_of(budget.ledger))
        await budget.settle(call_id, tool)
        fired.append(alerts_of(budget.ledger)[before:])
    return fired


async def test_each_alert_threshold_fires_once_per_window(redis: Redis) -> None:
    """Against $1.00 with alerts at 0.5 and 0.8, $0.10 calls alert on the 5th and 8th settle only; on the
    next day the 5th settle crosses 0.5 again and alerts once more."""
    config = budget_config({"scope": "user:a", "limit_usd": 1, "window": "day", "alert_at": [0.5, 0.8]})
    budget = await open_budget(redis, config, Clock())
    fired = await spend(budget, "user:a", "dime", 10)
    day1 = "user:a:d20261121"
    assert fired == [[], [], [], [], [(day1, "0.5")], [], [], [(day1, "0.8")], [], []]
    assert refusal_of(await budget.reserve("over", ["user:a"], "dime")).reason is RefusalReason.BUDGET_EXCEEDED
    assert len(budget.ledger.of(EventKind.BUDGET_ALERT)) == 2

    budget.clock.advance(24 * 3600 * 1000)
    fired = await spend(budget, "user:a", "dime", 6)
    assert fired == [[], [], [], [], [("user:a:d20261122", "0.5")], []]
    assert alerts_of(budget.ledger) == [(day1, "0.5"), (day1, "0.8"), ("user:a:d20261122", "0.5")]


async def test_one_settle_crossing_two_thresholds_fires_both_and_a_repeat_fires_none(redis: Redis) -> None:
    """One $0.10 settle against $0.11 with alerts at 0.5 and 0.8 fires both alerts; settling it again fires none."""
    config = budget_config({"scope": "user:b", "limit_usd": "0.11", "window": "day", "alert_at": [0.5, 0.8]})
    budget = await open_budget(redis, config, Clock())
    assert (await budget.reserve("big", ["user:b"], "dime")).hold is not None
    await budget.settle("big", "dime")
    assert alerts_of(budget.ledger) == [("user:b:d20261121", "0.5"), ("user:b:d20261121", "0.8")]
    assert (await budget.settle("big", "dime")).changed is False
    assert len(alerts_of(budget.ledger)) == 2


# --------------------------------------------------------------------------- concurrency


async def watch_limit(budget: Budget, bucket: str, limit: int, done: asyncio.Event) -> int:
    """Read the counter until `done`, asserting spent + held within the limit at every read; returns the reads."""
    reads = 0
    while not done.is_set():
        counter = await budget.counter(bucket)
        assert counter.spent + counter.held <= limit, counter
        reads += 1
    return reads


async def test_concurrent_reserves_of_a_new_principal_hold_exactly_what_fits(redis: Redis) -> None:
    """100 concurrent $0.01 reserves of a never-seen user with $0.37 grant exactly 37; spent + held never
    exceeds the limit, also while releases, settles and more reserves race."""
    config = budget_config({"scope": "user:new", "limit_usd": "0.37", "window": "day"})
    budget = await open_budget(redis, config, Clock())
    bucket, limit = "user:new:d20261121", 37 * CENT
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_limit(budget, bucket, limit, done))
    async with asyncio.timeout(10):
        replies = await asyncio.gather(*(budget.reserve(f"c{n}", ["user:new"]) for n in range(100)))
    granted = [reply.call_id for reply in replies if reply.hold is not None]
    refusals = [reply.refusal for reply in replies if reply.refusal is not None]
    assert len(granted) == 37
    assert {(r.reason, r.scope) for r in refusals} == {(RefusalReason.BUDGET_EXCEEDED, "user:new")}
    assert len(refusals) == 63
    assert await budget.counter(bucket) == Counter(held=limit)

    released, settled = granted[:10], granted[10:]
    async with asyncio.timeout(10):
        racing = await asyncio.gather(
            *(budget.release(call_id) for call_id in released),
            *(budget.settle(call_id, "flat") for call_id in settled),
            *(budget.reserve(f"more{n}", ["user:new"]) for n in range(50)),
        )
    done.set()
    assert await watcher > 0
    assert all(isinstance(reply, LedgerReply) and reply.changed for reply in racing[:37])
    more = sum(1 for reply in racing[37:] if isinstance(reply, ReserveReply) and reply.hold is not None)
    assert more <= 10
    assert await budget.counter(bucket) == Counter(spent=27 * CENT, held=more * CENT, by_tool={"flat": 27 * CENT})


async def test_the_tighter_org_limit_refuses_naming_the_org(redis: Redis) -> None:
    """With $0.05 left to the org and $0.37 to the user, 100 concurrent reserves grant 5 and refuse 95 naming
    the org, holding on both counters."""
    config = budget_config({"scope": "org:o", "limit_usd": "0.05", "window": "month"},
                           {"scope": "user:u", "limit_usd": "0.37", "window": "day"})
    budget = await open_budget(redis, config, Clock())
    async with asyncio.timeout(10):
        replies = await asyncio.gather(*(budget.reserve(f"c{n}", ["org:o", "user:u"]) for n in range(100)))
    assert sum(1 for reply in replies if reply.hold is not None) == 5
    refusals = [refusal_of(reply) for reply in replies if reply.hold is None]
    assert {(r.reason, r.scope) for r in refusals} == {(RefusalReason.BUDGET_EXCEEDED, "org:o")}
    assert len(refusals) == 95
    assert all("org:o" in r.message for r in refusals)
    org, user = await budget.accountant.counters(["org:o:m202611", "user:u:d20261121"])
    assert org == user == Counter(held=5 * CENT)


# --------------------------------------------------------------------------- idempotency (property)

CALLS = ["c0", "c1", "c2", "c3"]
HOLD = 100  # llm holds 100 tokens at 1 micro-USD a token
LIMITS = {"user:u:d20261121": 350, "org:o:m202611": 1_000}  # the user's is the tighter: three holds fit
PROPERTY_CONFIG = budget_config(
    {"scope": "org:o", "limit_usd": "0.001", "window": "month", "alert_at": [0.25]},
    {"scope": "user:u", "limit_usd": "0.00035", "window": "day", "alert_at": [0.5, 1]},
)
SCOPES = ["org:o", "user:u"]

Step = tuple[str, str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from(CALLS), st.just(0)),
        st.tuples(st.just("settle"), st.sampled_from(CALLS), st.integers(0, 250)),  # tokens; above 100 overruns
        st.tuples(st.just("release"), st.sampled_from(CALLS), st.just(0)),
        st.tuples(st.just("expire"), st.just(""), st.sampled_from([0, HOLD_LIFE_MS]) | st.integers(0, 9_000)),
    ),
    max_size=25,
)


@dataclass
class Call:
    state: HoldState
    expires_at_ms: int
    actual: int = 0


@dataclass
class Model:
    """What the counters must be: the calls' holds and settlements in plain Python."""

    calls: dict[str, Call] = field(default_factory=dict)
    overrun: int = 0
    late: int = 0

    @property
    def held(self) -> int:
        return HOLD * sum(1 for call in self.calls.values() if call.state is HoldState.HELD)

    @property
    def spent(self) -> int:
        return sum(call.actual for call in self.calls.values() if call.state is HoldState.SETTLED)

    def counter(self) -> Counter:
        by_use = {"llm": self.spent} if self.spent else {}
        return Counter(self.spent, self.held, self.overrun, self.late, by_use, {"m1": self.spent} if self.spent else {})

    def fits(self) -> bool:
        return all(self.spent + self.held + HOLD <= limit for limit in LIMITS.values())


async def check_step(budget: Budget, model: Model, step: Step) -> None:
    """Apply one step to the accountant and the model, and compare what each says."""
    op, call_id, value = step
    call = model.calls.get(call_id)
    if op == "reserve":
        reply = await budget.reserve(call_id, SCOPES, "llm")
        if call is None and model.fits():
            model.calls[call_id] = Call(HoldState.HELD, budget.clock() + HOLD_LIFE_MS)
        assert (reply.hold is not None) == (call_id in model.calls), (step, reply)
        assert reply.state is (model.calls[call_id].state if call_id in model.calls else HoldState.NONE)
    elif op == "settle":
        await check_settle(budget, model, call_id, value)
    elif op == "release":
        await check_repeatable(budget, budget.release(call_id), budget.release(call_id),
                               changed=call is not None and call.state is HoldState.HELD)
        if call is not None and call.state is HoldState.HELD:
            call.state = HoldState.RELEASED
    else:
        budget.clock.advance(value)
        due = [c for c in model.calls.values() if c.state is HoldState.HELD and c.expires_at_ms <= budget.clock()]
        assert await budget.ops.reap() == len(due)
        for expired in due:
            expired.state = HoldState.EXPIRED


async def check_settle(budget: Budget, model: Model, call_id: str, tokens: int) -> None:
    call = model.calls.get(call_id)
    first = await check_repeatable(budget, budget.settle(call_id, "llm", tokens),
                                   budget.settle(call_id, "llm", tokens + 7),
                                   changed=call is not None and call.state is not HoldState.SETTLED)
    if call is None or call.state is HoldState.SETTLED:
        assert first.actual_micros == (tokens if call is None else call.actual)
        return
    late = call.state is not HoldState.HELD
    assert (first.actual_micros, first.late) == (tokens, late)
    assert first.overrun_micros == (0 if late else max(tokens - HOLD, 0))
    model.overrun += first.overrun_micros
    model.late += tokens if late else 0
    call.state, call.actual = HoldState.SETTLED, tokens


async def check_repeatable(budget: Budget, once: Any, again: Any, *, changed: bool) -> LedgerReply:
    """Run a settle or release and then its repeat: the repeat reports no change and changes no counter."""
    first: LedgerReply = await once
    assert first.changed is changed, first
    counters = await budget.accountant.counters(list(LIMITS))
    second: LedgerReply = await again
    assert second.changed is False, second
    assert await budget.accountant.counters(list(LIMITS)) == counters
    return first


async def check_counters(budget: Budget, model: Model) -> None:
    """Every counter equals the model's, keeps spent + held within limit + overrun + late, and the
    reaper's index lists exactly the calls still held."""
    counters = await budget.accountant.counters(list(LIMITS))
    for (name, limit), counter in zip(LIMITS.items(), counters, strict=True):
        assert counter == model.counter(), name
        assert counter.spent + counter.held <= limit + counter.overrun + counter.late
    held = {call_id for call_id, call in model.calls.items() if call.state is HoldState.HELD}
    assert set(await budget.accountant.due_holds(budget.clock() + 10**9)) == held


async def run_steps(client: Redis, ops: list[Step]) -> tuple[Budget, Model]:
    budget = await open_budget(client, PROPERTY_CONFIG, Clock())
    model = Model()
    for step in ops:
        await check_step(budget, model, step)
        await check_counters(budget, model)
    return budget, model


@settings(max_examples=250, deadline=None)
@given(ops=steps)
async def test_settle_and_release_are_idempotent_and_counters_stay_exact(redis_server: RedisServer,
                                                                         ops: list[Step]) -> None:
    """For any sequence of reserves, settles (some above the hold), releases and expiries, every counter matches
    the model after every step, spent + held stays within limit + overrun + late, and a repeat changes nothing."""
    client = redis_client(redis_server.url)
    try:
        await run_steps(client, ops)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- ledger rebuild


async def stored(client: Redis, accountant: Accountant, buckets: list[str]) -> dict[str, dict[str, int]]:
    """Each bucket's hash without zero fields (a freed hold leaves `held: 0` behind, a rebuild writes nothing)."""
    hashes = {}
    for name in buckets:
        raw: dict[Any, Any] = await client.hgetall(accountant.spend_key(name))  # str: the client decodes
        hashes[name] = {str(key): int(value) for key, value in raw.items() if int(value)}
    return hashes


@settings(max_examples=120, deadline=None)
@given(ops=steps)
async def test_folding_the_ledger_rebuilds_the_same_counters(redis_server: RedisServer, ops: list[Step]) -> None:
    """After any mix of operations, the ledger folded and written to a fresh prefix gives the same counters,
    breakdowns, fired alerts, hold states and reaper index as the accountant's own."""
    client = redis_client(redis_server.url)
    try:
        budget, model = await run_steps(client, ops)
        rebuilt = Accountant(client, f"t{uuid4().hex[:10]}")
        folded = fold(event for event in budget.ledger.events if event.kind in LEDGER_KINDS)
        await write_folded(rebuilt, folded, budget.ops.books.limits)

        names = list(LIMITS)
        assert await rebuilt.counters(names) == await budget.accountant.counters(names)
        assert await stored(client, rebuilt, names) == await stored(client, budget.accountant, names)
        for call_id in model.calls:
            assert (await rebuilt.hold(call_id))["state"] == (await budget.accountant.hold(call_id))["state"]
        far = budget.clock() + 10**9
        assert await rebuilt.due_holds(far) == await budget.accountant.due_holds(far)
    finally:
        await client.aclose()


async def test_a_rebuilt_hold_answers_a_repeated_reserve_as_the_original_did(redis: Redis) -> None:
    """A hold rebuilt from the ledger keeps its max_tokens, also 0, so a repeated reserve gets the same hold."""
    budget = await open_budget(redis, budget_config({"scope": "user:x", "limit_usd": 1}), Clock())
    for call_id, tool in (("none", "flat"), ("some", "llm"), ("zero", "tight")):
        assert (await budget.reserve(call_id, ["user:x"], tool)).hold is not None
    original = {call_id: await budget.reserve(call_id, ["user:x"]) for call_id in ("none", "some", "zero")}
    assert [reply.hold.max_tokens for reply in original.values() if reply.hold] == [None, 100, 0]

    rebuilt = Accountant(redis, f"t{uuid4().hex[:10]}")
    await write_folded(rebuilt, fold(budget.ledger.events), budget.ops.books.limits)
    await rebuilt.set_epoch(budget.ops.books.epoch)
    ops = BudgetOperations(rebuilt, budget.ops.books, budget.ledger.emit, budget.clock)
    for call_id, reply in original.items():
        assert await ops.reserve(request(call_id, ["user:x"], budget.clock())) == reply, call_id


# --------------------------------------------------------------------------- failing closed


@pytest.mark.parametrize("tools", [["flat"], ["dime", "flat"]], ids=["one-tool", "with-economy-tool"])
async def test_reserve_fails_closed_when_redis_is_unreachable(tools: list[str]) -> None:
    """With nothing listening on Redis's port, reserve refuses with reason unavailable within 2 s and emits nothing."""
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, retries=0)
    clock, config = Clock(), budget_config({"scope": "user:x", "limit_usd": 1})
    ledger = Ledger(clock)
    books = Books(config, LimitBook(config.budgets, []), epoch="any")
    ops = BudgetOperations(Accountant(client, f"t{uuid4().hex[:10]}"), books, ledger.emit, clock)
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            reply = await ops.reserve(request("c1", ["user:x"], clock(), *tools))
        assert time.monotonic() - started < 2
    finally:
        await client.aclose()
    refusal = refusal_of(reply)
    assert (refusal.reason, refusal.retry_after_ms) == (RefusalReason.UNAVAILABLE, 1_000)
    assert ledger.events == []


async def test_reserve_fails_closed_when_redis_lost_the_epoch(redis: Redis) -> None:
    """A Redis whose epoch differs from the books' (or has none) refuses every reserve unavailable, marks the
    counters as lost, and holds nothing, even once the epoch is back, until the counters are declared ok."""
    budget = await open_budget(redis, budget_config({"scope": "user:x", "limit_usd": 1}), Clock())
    books_epoch = budget.ops.books.epoch
    for in_redis in ("another-epoch", None):
        budget.ops.books.counters_ok = True
        if in_redis is None:
            await redis.delete(budget.accountant.epoch_key)
        else:
            await budget.accountant.set_epoch(in_redis)
        assert refusal_of(await budget.reserve("c1", ["user:x"])).reason is RefusalReason.UNAVAILABLE
        assert budget.ops.books.counters_ok is False
        assert (await budget.ops.status(StatusRequest())).counters_ok is False
        assert await budget.counter("user:x:d20261121") == Counter()
        assert await budget.accountant.hold("c1") == {}

    await budget.accountant.set_epoch(books_epoch)
    assert refusal_of(await budget.reserve("c1", ["user:x"])).reason is RefusalReason.UNAVAILABLE
    budget.ops.books.counters_ok = True  # what the service does once it sees its epoch in Redis again
    assert (await budget.reserve("c1", ["user:x"])).hold is not None
    assert budget.ledger.of(EventKind.BUDGET_RESERVED)[0].call_id == "c1"


# --------------------------------------------------------------------------- expiry


async def test_an_expired_hold_is_freed_once_and_a_later_settle_is_late_spend(redis: Redis) -> None:
    """The reaper frees nothing before a hold's expiry; at it, two concurrent reapers free each of 20 holds
    exactly once, held returns to 0, and a settle arriving afterwards is recorded as late spend."""
    budget = await open_budget(redis, budget_config({"scope": "user:x", "limit_usd": 1}), Clock())
    calls = [f"c{n}" for n in range(20)]
    for call_id in calls:
        reply = await budget.reserve(call_id, ["user:x"])
        assert reply.hold is not None and reply.hold.expires_at_ms == NOON + HOLD_LIFE_MS
    bucket = "user:x:d20261121"

    budget.clock.now = NOON + HOLD_LIFE_MS - 1
    assert await budget.ops.reap() == 0
    assert (await budget.counter(bucket)).held == 20 * CENT

    budget.clock.now = NOON + HOLD_LIFE_MS
    async with asyncio.timeout(10):
        freed = await asyncio.gather(budget.ops.reap(), budget.ops.reap())
    assert sum(freed) == 20
    assert await budget.ops.reap() == 0
    assert await budget.counter(bucket) == Counter()
    released = [e for e in budget.ledger.of(EventKind.BUDGET_RELEASED) if e.detail["outcome"] == "released"]
    assert sorted(e.call_id or "" for e in released) == sorted(calls)
    assert {e.reason for e in released} == {"expired"}
    assert {(await budget.accountant.hold(call_id))["state"] for call_id in calls} == {"expired"}

    budget.clock.advance(1_000)
    settled = await budget.settle("c0", "flat")
    assert (settled.changed, settled.state, settled.actual_micros, settled.late) == (True, HoldState.SETTLED, CENT,
                                                                                     True)
    assert settled.overrun_micros == 0
    assert await budget.counter(bucket) == Counter(spent=CENT, late=CENT, by_tool={"flat": CENT})
    assert (await budget.settle("c0", "flat")).changed is False
    assert (await budget.release("c0")).changed is False
    assert await budget.counter(bucket) == Counter(spent=CENT, late=CENT, by_tool={"flat": CENT})


# --------------------------------------------------------------------------- the ledger in EVENTS


@dataclass
class Bus:
    """EVENTS under a subject prefix of this test's own."""

    nc: NatsClient
    subjects: Subjects

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    def outcomes(self, source: str) -> Outcomes:
        """What a budget service replica named `source` emits its events with."""
        return Outcomes(self.nc, self.js, self.subjects, source=source)


@pytest_asyncio.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    nc = await nats.connect(nats_server.url)
    subjects = Subjects(f"t{uuid4().hex[:10]}")
    await provision_streams(nc.jetstream(), subjects)  # the streams now take this test's subjects
    yield Bus(nc, subjects)
    await nc.close()


def replica(client: Redis, prefix: str, epoch: str, config: Config, emit: Emit, clock: Clock) -> BudgetOperations:
    """One budget service replica's operations on a shared Redis prefix."""
    books = Books(config, LimitBook(config.budgets, []), epoch=epoch)
    return BudgetOperations(Accountant(client, prefix), books, emit, clock)


async def test_every_alert_of_one_settle_reaches_the_ledger(redis: Redis, bus: Bus) -> None:
    """A settle crossing three thresholds on two scopes publishes three alerts to EVENTS, and a rebuild sees all."""
    config = budget_config({"scope": "org:o", "limit_usd": "0.10", "window": "month", "alert_at": [0.5]},
                           {"scope": "user:u", "limit_usd": "0.10", "window": "day", "alert_at": [0.5, 0.8]})
    prefix, epoch, clock = f"t{uuid4().hex[:10]}", new_epoch(), Clock()
    await Accountant(redis, prefix).set_epoch(epoch)
    ops = replica(redis, prefix, epoch, config, bus.outcomes("budget-1").emit, clock)
    assert (await ops.reserve(request("big", ["org:o", "user:u"], clock(), "dime"))).hold is not None
    assert (await ops.settle(SettleRequest(call_id="big", tool="dime"))).changed

    folded = fold(await read_ledger(bus.js, bus.subjects))
    assert folded.alerts == {("org:o:m202611", "0.5"), ("user:u:d20261121", "0.5"), ("user:u:d20261121", "0.8")}


async def test_a_rebuild_counts_a_settle_stamped_earlier_than_its_reserve(
    redis: Redis, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call reserved by a replica whose clock is 5 ms ahead and settled 1 ms later by another is, after a
    rebuild from EVENTS, settled spend and not an open hold: the ledger is replayed in stream order."""
    config = budget_config({"scope": "user:u", "limit_usd": 1})
    prefix, epoch, clock = f"t{uuid4().hex[:10]}", new_epoch(), Clock()
    await Accountant(redis, prefix).set_epoch(epoch)
    first = replica(redis, prefix, epoch, config, bus.outcomes("budget-1").emit, clock)
    second = replica(redis, prefix, epoch, config, bus.outcomes("budget-2").emit, clock)
    monkeypatch.setattr(outcomes_module, "now_ms", lambda: NOON + 5)  # each replica stamps with its own clock
    assert (await first.reserve(request("c1", ["user:u"], clock()))).hold is not None
    monkeypatch.setattr(outcomes_module, "now_ms", lambda: NOON + 1)
    assert (await second.settle(SettleRequest(call_id="c1", tool="flat"))).changed

    rebuilt = Accountant(redis, f"t{uuid4().hex[:10]}")
    await write_folded(rebuilt, fold(await read_ledger(bus.js, bus.subjects)), first.books.limits)
    [counter] = await rebuilt.counters(["user:u:d20261121"])
    assert counter == Counter(spent=CENT, held=0, by_tool={"flat": CENT})

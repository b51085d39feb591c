"""Spend + holds never exceed any budget limit under a crash mid-call (DESIGN.md §8, third guarantee).

Two crashes: an executor SIGKILLed with budgeted calls in flight (their holds expire and come back
exactly once; nothing already spent changes), and redis-server SIGKILLed under load without
persistence (the accountant fails closed, `rebuild` restores the counters from the ledger in
EVENTS, and the budget still admits exactly as many calls as it pays for).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from services.budget.app import BudgetService, BudgetSettings
from services.router.app import RouterService, RouterSettings
from shared.budget_client import BudgetClient
from shared.client import CallResult, ToolbusClient
from shared.codec import unpack
from shared.config import Config, hash_api_key, parse_config
from shared.contracts import Event, ScopeBudget, StatusRequest
from shared.embedded import NatsServer, RedisServer, RedisServerSettings
from shared.mesh import bootstrap
from shared.subjects import Subjects
from tests.helpers import InProcessMesh, ServiceProcessHandle, eventually

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module")]

CENT = 10_000  # micro-USD
KEY = "chaos-budget-key"


def crash_config(prefix: str) -> Config:
    return parse_config({
        "prefix": prefix,
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]}},
        "pools": {"default": {"concurrency": 32, "timeout_s": 10, "ack_wait_s": 2}},
        "principals": [{"name": "payer", "key_sha256": hash_api_key(KEY), "roles": ["user"],
                        "scope": {"org": "acme", "user": "payer"}}],
        "roles": {"user": {"allow": ["demo__*"]}},
        "tools": {"demo__echo": {"cost_usd": "0.01"}, "demo__sleep_ms": {"cost_usd": "0.01"}},
        "budgets": [{"scope": "user:payer", "limit_usd": "1.00", "window": "day"}],
        "accounting": {"hold_ttl_s": 1, "settle_margin_s": 1},
    }, source="<budget chaos>")


async def payer_budget(accountant: BudgetClient) -> ScopeBudget:
    [budget] = (await accountant.status(StatusRequest(scope="user:payer"))).budgets
    return budget


async def test_executor_killed_with_calls_in_flight_returns_their_holds_exactly_once(
    nats_server: NatsServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Holds of calls whose worker was SIGKILLed expire and return once; spend already settled is unchanged."""
    prefix = f"crash{uuid.uuid4().hex[:8]}"
    config = crash_config(prefix)
    await bootstrap(nats_server.url, config)
    budget = BudgetService(BudgetSettings(nats_server.url, prefix, "budget-chaos", redis_server.url))
    router = RouterService(RouterSettings(nats_server.url, prefix, instance="router-chaos"))
    worker = ServiceProcessHandle("services.executor", nats_server.url, tmp_path / "worker-1.log",
                                  "--prefix", prefix, "--redis-url", redis_server.url)
    await budget.start()
    await router.start()
    nc = await nats.connect(nats_server.url)
    accountant = BudgetClient(nc, Subjects(prefix))
    released: list[Event] = []

    async def on_released(msg: Msg) -> None:
        released.append(unpack(Event, msg.data))

    try:
        await worker.wait_ready()
        await nc.subscribe(f"{prefix}.evt.budget.released", cb=on_released)
        async with ToolbusClient(nats_server.url, KEY, prefix=prefix) as client:
            done = await asyncio.gather(*(client.call("demo__echo", {"text": "paid"}) for _ in range(5)))
            assert [r.status.value for r in done] == ["ok"] * 5
            # Subscribed only now: the echo calls' own `call.started` events must not count as sleeps started.
            started = await nc.subscribe(f"{prefix}.evt.call.started")
            in_flight = [await client.submit("demo__sleep_ms", {"ms": 8000}) for _ in range(6)]
            for _ in in_flight:
                await started.next_msg(timeout=30)
            assert (await payer_budget(accountant)).held_micros == 6 * CENT
            worker.kill()

            after = await eventually(lambda: _settled_budget(accountant), timeout=40, interval=0.2)
            assert (after.spent_micros, after.held_micros) == (5 * CENT, 0)
            expired = Counter(e.call_id for e in released if e.reason == "expired")
            assert expired == Counter(dict.fromkeys(in_flight, 1))

            successor = ServiceProcessHandle("services.executor", nats_server.url, tmp_path / "worker-2.log",
                                             "--prefix", prefix, "--redis-url", redis_server.url)
            await successor.wait_ready()
            results = [await client.wait_result(call_id, timeout_s=60) for call_id in in_flight]
        # The redelivered calls must not run on a hold that is gone: each ends `timeout`, once.
        assert {r.status.value for r in results} == {"timeout"}
        assert all("budget hold" in _message(r) for r in results)
        final = await payer_budget(accountant)
        assert (final.spent_micros, final.held_micros) == (5 * CENT, 0)
        assert Counter(e.call_id for e in released if e.reason == "expired") == expired
        assert successor.stop() == 0
    finally:
        await nc.close()
        await router.stop()
        await budget.stop()
        with contextlib.suppress(Exception):
            worker.kill()


async def _settled_budget(accountant: BudgetClient) -> ScopeBudget | None:
    budget = await payer_budget(accountant)
    return budget if budget.held_micros == 0 else None


def _message(result: CallResult) -> str:
    return result.response.error.message if result.response.error else ""


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server without persistence: SIGKILL and start again means every counter is gone."""
    server = RedisServer(RedisServerSettings(data_dir=tmp_path / "redis", appendonly=False))
    server.start()
    yield server
    server.stop()


async def test_redis_killed_under_load_fails_closed_and_rebuild_restores_the_counters(
    nats_server: NatsServer, volatile_redis: RedisServer
) -> None:
    """Redis SIGKILLed mid-load: calls are refused until rebuilt, then the $1.00 budget admits exactly 100 calls."""
    prefix = f"redis{uuid.uuid4().hex[:8]}"
    peaks: list[int] = []
    async with InProcessMesh(nats_server.url, crash_config(prefix), volatile_redis.url) as mesh:
        nc = await nats.connect(mesh.nats_url)
        accountant = BudgetClient(nc, Subjects(prefix))
        sampler = asyncio.create_task(_sample_peaks(accountant, peaks))
        try:
            async with ToolbusClient(nats_server.url, KEY, prefix=prefix) as client:
                first = await _load_then(client, 60, lambda: asyncio.to_thread(_kill_and_start, volatile_redis))
                blocked = await _calls(client, 5)
                assert {_reason(r) for r in blocked} == {("budget_exceeded", True)}  # fail closed, unavailable

                rebuilt = await accountant.rebuild()
                paid_before = sum(r.status.value == "ok" for r in first)
                assert rebuilt.ok and rebuilt.spent_micros == paid_before * CENT and rebuilt.held_micros == 0

                after = await _calls(client, 150)
            paid_after = sum(r.status.value == "ok" for r in after)
            assert paid_before + paid_after == 100
            final = await payer_budget(accountant)
            assert (final.spent_micros, final.held_micros) == (100 * CENT, 0)
            assert max(peaks) <= 100 * CENT
        finally:
            sampler.cancel()
            await nc.close()


async def _calls(client: ToolbusClient, count: int) -> list[CallResult]:
    calls = (client.call("demo__sleep_ms", {"ms": 30}, timeout_s=60, raise_on_error=False) for _ in range(count))
    return list(await asyncio.gather(*calls))


async def _load_then(client: ToolbusClient, count: int, fault: Callable[[], Awaitable[object]]) -> list[CallResult]:
    """Run `count` calls and inject the fault once a third of them have answered."""
    load = [asyncio.ensure_future(_calls(client, 1)) for _ in range(count)]
    await eventually(lambda: _done_at_least(load, count // 3), timeout=60)
    await fault()
    return [result for batch in await asyncio.gather(*load) for result in batch]


async def _done_at_least(tasks: Sequence[asyncio.Future[list[CallResult]]], count: int) -> bool:
    await asyncio.sleep(0.01)
    return sum(task.done() for task in tasks) >= count


def _kill_and_start(server: RedisServer) -> None:
    server.kill()
    server.start()


def _reason(result: CallResult) -> tuple[str, bool]:
    error = result.response.error
    assert error is not None, result
    data = error.data.model_dump()
    return data["reason"], bool(data.get("unavailable"))


async def _sample_peaks(accountant: BudgetClient, peaks: list[int]) -> None:
    """Record spent + held of the budget every few milliseconds, for the whole run."""
    while True:
        with contextlib.suppress(Exception):
            budget = await payer_budget(accountant)
            peaks.append(budget.spent_micros + budget.held_micros)
        await asyncio.sleep(0.02)

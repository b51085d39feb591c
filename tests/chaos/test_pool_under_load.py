"""Under load, no SIGKILLed worker or router, restarted nats-server or redis-server loses or re-runs a call.

DESIGN.md §8: "No accepted call is lost … every accepted call gets exactly one final result" and
"A completed call is never executed again on redelivery". 600 calls run on two worker processes;
the demo server records every execution (with its start time), RESULTS holds each final result
(with its store time), so the test can check, per call:
* exactly one final result is stored, and it is `ok`;
* no execution of the call started after its result was stored (a completed call never re-runs);
* producers subscribed to results saw at most one result per call (SIGKILL case).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.router.app import RouterService, RouterSettings
from shared.client import ToolbusClient
from shared.codec import dump_model_json
from shared.config import Config
from shared.contracts import ToolCallResponse
from shared.embedded import NatsServer, NatsServerSettings, RedisServer, RedisServerSettings
from shared.mesh import bootstrap
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import ServiceProcessHandle, eventually, executions

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="function")]

CALLS = 600
SLEEP_MS = 40
JS_REQUEST_TIMEOUT_S = 5  # nats-py's default JetStream request timeout


@pytest.fixture
def nats_fresh(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test alone (file store), so it can be killed and restarted."""
    server = NatsServer(NatsServerSettings(data_dir=tmp_path / "nats"))
    server.start()
    yield server
    server.stop()


def load_config(git_repo: Path, record: Path) -> Config:
    base = make_config(git_repo).model_dump(mode="json")
    base["servers"] = {"demo": base["servers"]["demo"] | {"env": {"TOOLBUS_DEMO_RECORD": str(record)}}}
    base["pools"]["default"].update(workers=2, concurrency=16, ack_wait_s=2, max_deliveries=10)
    return Config.model_validate(base)


@pytest_asyncio.fixture
async def two_workers(
    nats_fresh: NatsServer, redis_server: RedisServer, git_repo: Path, tmp_path: Path
) -> AsyncIterator[tuple[RouterService, list[ServiceProcessHandle], Path]]:
    record = tmp_path / "record.jsonl"
    await bootstrap(nats_fresh.url, load_config(git_repo, record))
    workers = [ServiceProcessHandle("services.executor", nats_fresh.url, tmp_path / f"worker-{n}.log",
                                    "--redis-url", redis_server.url, "--instance", f"worker-{n}") for n in (1, 2)]
    await asyncio.gather(*(w.wait_ready() for w in workers))
    router = RouterService(RouterSettings(nats_fresh.url, instance="router-chaos"))
    await router.start()
    yield router, workers, record
    await router.stop()
    for worker in workers:
        if worker.process.poll() is None:
            worker.stop()


async def submit_all(client: ToolbusClient) -> list[str]:
    return list(await asyncio.gather(*(client.submit("demo__sleep_ms", {"ms": SLEEP_MS}) for _ in range(CALLS))))


async def check_exactly_once(client: ToolbusClient, nc: NatsClient, calls: list[str], record: Path) -> None:
    """Every call has one stored ok result, and none of its executions started after that result."""
    results = await asyncio.gather(*(client.wait_result(c, timeout_s=120) for c in calls))
    assert Counter(r.status.value for r in results) == {"ok": CALLS}
    stored_at = {}
    for call_id in calls:
        stored = await nc.jetstream().get_last_msg("RESULTS", f"toolbus.result.{call_id}", direct=True)
        assert stored.time is not None
        stored_at[call_id] = stored.time.timestamp()
    runs = [e for e in executions(record) if e["call_id"] in stored_at]
    assert {e["call_id"] for e in runs} == set(calls), "every call ran"
    late = [e for e in runs if float(str(e["ts"])) > stored_at[str(e["call_id"])]]
    assert late == [], f"{len(late)} executions started after their call's result was stored"


async def load_with_fault(
    url: str, record: Path, fault: Callable[[], Awaitable[object]], check_url: str | None = None
) -> list[str]:
    """Accept CALLS calls, inject `fault` once a quarter of them ran, then check each is answered once."""
    async with ToolbusClient(url, ADMIN_KEY) as client:
        calls = await submit_all(client)
        await eventually(lambda: _ran_at_least(record, CALLS // 4), timeout=60)
        await fault()
        nc = await nats.connect((check_url or url).split(","))
        try:
            await check_exactly_once(client, nc, calls, record)
        finally:
            await nc.close()
    return calls


async def test_sigkill_of_one_worker_under_load_loses_and_repeats_nothing(
    nats_fresh: NatsServer, two_workers: tuple[RouterService, list[ServiceProcessHandle], Path]
) -> None:
    """600 calls, one of two workers SIGKILLed mid-run: one ok result per call, nothing completed re-runs."""
    _router, workers, record = two_workers
    seen: Counter[str] = Counter()

    async def count(msg: Msg) -> None:
        seen[msg.subject.rsplit(".", 1)[-1]] += 1

    nc = await nats.connect(nats_fresh.url)
    await nc.subscribe("toolbus.result.*", cb=count)
    try:
        async with ToolbusClient(nats_fresh.url, ADMIN_KEY) as client:
            calls = await submit_all(client)
            await eventually(lambda: _ran_at_least(record, CALLS // 4), timeout=60)
            workers[0].kill()
            await check_exactly_once(client, nc, calls, record)
        await nc.flush()
        reruns = [c for c, n in Counter(str(e["call_id"]) for e in executions(record)).items() if n > 1]
        assert reruns, "the kill must have interrupted calls in flight, which then ran again elsewhere"
        assert max(seen[c] for c in calls) == 1, "a producer saw a second result for some call"
        assert all(seen[c] == 1 for c in calls)
    finally:
        await nc.close()


async def test_nats_restart_under_load_loses_and_repeats_nothing(
    nats_fresh: NatsServer, two_workers: tuple[RouterService, list[ServiceProcessHandle], Path]
) -> None:
    """600 calls, nats-server restarted mid-run (file store): each call gets exactly one ok result."""
    _router, _workers, record = two_workers
    await load_with_fault(nats_fresh.url, record, lambda: asyncio.to_thread(nats_fresh.restart))


async def test_wait_result_rides_out_a_nats_restart(nats_fresh: NatsServer, git_repo: Path, tmp_path: Path) -> None:
    """A producer waiting on a result while nats-server is down (longer than a request timeout) still gets it."""
    await bootstrap(nats_fresh.url, load_config(git_repo, tmp_path / "record.jsonl"))
    call_id = str(uuid.uuid4())
    async with ToolbusClient(nats_fresh.url, ADMIN_KEY) as client:
        waiting = asyncio.create_task(client.wait_result(call_id, timeout_s=60))
        await asyncio.to_thread(nats_fresh.kill)
        await asyncio.sleep(JS_REQUEST_TIMEOUT_S + 1)  # polls made while it is down time out
        assert not waiting.done(), "a poll that timed out while the server was away must not end the wait"
        await asyncio.to_thread(nats_fresh.start)
        nc = await nats.connect(nats_fresh.url)
        try:
            response = ToolCallResponse(id=1, result={"content": [{"type": "text", "text": "late"}]})
            await nc.jetstream().publish(f"toolbus.result.{call_id}", dump_model_json(response))
        finally:
            await nc.close()
        result = await waiting
    assert result.status.value == "ok" and result.text == "late"


@pytest.fixture
def redis_fresh(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (AOF), so it can be restarted."""
    server = RedisServer(RedisServerSettings(data_dir=tmp_path / "redis"))
    server.start()
    yield server
    server.stop()


async def test_router_sigkill_under_load_loses_nothing(
    nats_fresh: NatsServer, redis_fresh: RedisServer, git_repo: Path, tmp_path: Path
) -> None:
    """600 calls, the router process SIGKILLed mid-run and started again: each call gets one ok result."""
    record = tmp_path / "record.jsonl"
    await bootstrap(nats_fresh.url, load_config(git_repo, record))
    worker = ServiceProcessHandle("services.executor", nats_fresh.url, tmp_path / "worker.log",
                                  "--redis-url", redis_fresh.url)
    router = ServiceProcessHandle("services.router", nats_fresh.url, tmp_path / "router-1.log")
    await asyncio.gather(worker.wait_ready(), router.wait_ready())
    routers = [router]

    async def replace_router() -> None:
        routers[-1].kill()
        routers.append(ServiceProcessHandle("services.router", nats_fresh.url, tmp_path / "router-2.log"))
        await routers[-1].wait_ready()

    try:
        await load_with_fault(nats_fresh.url, record, replace_router)
    finally:
        assert routers[-1].stop() == 0 and worker.stop() == 0


async def test_redis_restart_under_load_loses_and_repeats_nothing(
    nats_fresh: NatsServer, redis_fresh: RedisServer, git_repo: Path, tmp_path: Path
) -> None:
    """600 calls, redis-server restarted mid-run: claims recover, each call gets one ok result, none re-runs."""
    record = tmp_path / "record.jsonl"
    await bootstrap(nats_fresh.url, load_config(git_repo, record))
    workers = [ServiceProcessHandle("services.executor", nats_fresh.url, tmp_path / f"worker-{n}.log",
                                    "--redis-url", redis_fresh.url, "--instance", f"worker-{n}") for n in (1, 2)]
    await asyncio.gather(*(w.wait_ready() for w in workers))
    router = RouterService(RouterSettings(nats_fresh.url, instance="router-redis-chaos"))
    await router.start()
    try:
        await load_with_fault(nats_fresh.url, record, lambda: asyncio.to_thread(redis_fresh.restart))
    finally:
        await router.stop()
        assert all(w.stop() == 0 for w in workers)


async def _ran_at_least(record: Path, count: int) -> bool:
    await asyncio.sleep(0.02)
    return len(executions(record)) >= count

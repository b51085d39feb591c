"""Two workers of one pool share a circuit breaker, honour deadlines and cancellations, and keep attempt history."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from shared.client import ToolbusClient
from shared.codec import pack, unpack
from shared.config import Config
from shared.contracts import DeadLetter, Event, WorkItem
from shared.embedded import NatsServer, RedisServer
from shared.errors import CallFailed
from shared.outcomes import now_ms
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh, eventually, executions

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

FAIL_MAX = 3
RESET_S = 1.0


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-state")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(
    nats_server: NatsServer, redis_server: RedisServer, git_repo: Path, demo_state: Path
) -> AsyncIterator[InProcessMesh]:
    """Two in-process workers of pool `default` in front of one stdio demo server each."""
    base = make_config(git_repo).model_dump(mode="json")
    demo = base["servers"]["demo"]
    demo["env"] = {"TOOLBUS_DEMO_RECORD": str(demo_state / "record.jsonl"),
                   "TOOLBUS_DEMO_BROKEN_FILE": str(demo_state / "broken")}
    base["servers"] = {"demo": demo}
    base["pools"]["default"].update(breaker={"fail_max": FAIL_MAX, "reset_s": RESET_S}, max_deliveries=3)
    async with InProcessMesh(nats_server.url, Config.model_validate(base), redis_server.url, workers=2) as mesh:
        yield mesh


def runs_of(demo_state: Path, call_id: str) -> int:
    return sum(1 for entry in executions(demo_state / "record.jsonl") if entry["call_id"] == call_id)



async def test_expired_deadline_is_never_executed(pool: InProcessMesh, demo_state: Path) -> None:
    """A routed call whose deadline passes before a worker reaches it gets -32008 and the tool never runs."""
    call_id = str(uuid.uuid4())
    work = WorkItem(call_id=call_id, request_id=9, public_tool="demo__echo", server="demo", tool="echo",
                    pool="default", arguments={"text": "too late"}, principal="admin", priority=2,
                    deadline_ms=now_ms() - 1, accepted_at_ms=now_ms() - 5)
    nc = await nats.connect(pool.nats_url)
    try:
        await nc.jetstream().publish("toolbus.work.default.2", pack(work))
    finally:
        await nc.close()
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        result = await client.wait_result(call_id, timeout_s=20)
    assert result.status.value == "timeout"
    assert result.response.error is not None and result.response.error.code == -32008
    assert runs_of(demo_state, call_id) == 0


async def test_tool_error_is_final_and_runs_once(pool: InProcessMesh, demo_state: Path) -> None:
    """A tool's own isError result is answered as tool_error and never retried."""
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        result = await client.call("demo__fail", {"message": "mine"})
    assert result.status.value == "tool_error"
    assert runs_of(demo_state, result.call_id) == 1


async def test_call_longer_than_ack_wait_is_not_redelivered(pool: InProcessMesh, demo_state: Path) -> None:
    """In-progress acks keep a call that outlives AckWait (2 s here) on its worker: it runs once."""
    assert pool.config.pools["default"].ack_wait_s == 2
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        result = await client.call("demo__sleep_ms", {"ms": 5000})
    assert result.text == "slept 5000 ms"
    assert runs_of(demo_state, result.call_id) == 1


async def test_cancelling_a_running_call_stops_it(pool: InProcessMesh, demo_state: Path) -> None:
    """A publish to toolbus.cancel.<call_id> ends a running call with -32800 long before it would finish."""
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        started = time.monotonic()
        call_id = await client.submit("demo__sleep_ms", {"ms": 30_000})
        await eventually(lambda: _ran(demo_state, call_id), timeout=20)
        await client.cancel(call_id)
        result = await client.wait_result(call_id, timeout_s=20)
    assert result.response.error is not None and result.response.error.code == -32800
    assert result.status.value == "failed"
    assert time.monotonic() - started < 25, "the 30 s sleep must not have run to its end"
    assert all(not executor.worker.running for executor in pool.executors)


async def _ran(demo_state: Path, call_id: str) -> bool:
    await asyncio.sleep(0)
    return runs_of(demo_state, call_id) > 0


async def test_dead_letter_carries_every_attempt(pool: InProcessMesh, demo_state: Path) -> None:
    """A call failing on every attempt is dead-lettered with one history entry per attempt, from any worker.

    Its third failure also opens the shared breaker (fail_max 3), which the next test relies on.
    """
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        with pytest.raises(CallFailed) as failure:
            await client.call("demo__crash", call_id=(call_id := str(uuid.uuid4())))
    assert failure.value.code == -32060
    nc = await nats.connect(pool.nats_url)
    try:
        stored = await nc.jetstream().get_last_msg("DLQ", "toolbus.dlq.default")
    finally:
        await nc.close()
    letter = unpack(DeadLetter, stored.data or b"")
    assert letter.work.call_id == call_id
    assert [a.attempt for a in letter.attempts] == [1, 2, 3]
    assert {a.worker_id for a in letter.attempts} <= {"executor-default-1", "executor-default-2"}



async def test_shared_breaker_opens_fails_fast_and_closes_after_a_good_trial(
    pool: InProcessMesh, demo_state: Path
) -> None:
    """After fail_max pool-wide failures the breaker is open: calls fail fast, unexecuted; a good trial closes it."""
    (demo_state / "broken").touch()
    async with ToolbusClient(pool.nats_url, ADMIN_KEY) as client:
        breaker = pool.executors[1].worker.breakers["demo"]  # the other worker sees the same state
        assert (await breaker.snapshot()).state.value == "open"
        refused = await client.call("demo__fragile", raise_on_error=False)
        assert refused.response.error is not None and refused.response.error.code == -32050
        assert refused.response.error.data.model_dump()["retry_after_ms"] > 0
        assert runs_of(demo_state, refused.call_id) == 0, "an open breaker must not reach the backend"
        (demo_state / "broken").unlink()

        async def trial_succeeds() -> bool:
            result = await client.call("demo__fragile", raise_on_error=False)
            return result.response.error is None and result.text == "ok"

        await eventually(trial_succeeds, timeout=RESET_S * 10, interval=RESET_S / 4)
        assert (await breaker.snapshot()).state.value == "closed"


async def test_breaker_opened_after_exactly_fail_max_failures(pool: InProcessMesh) -> None:
    """The breaker.opened event reports fail_max consecutive failures."""
    nc = await nats.connect(pool.nats_url)
    try:
        info = await nc.jetstream().get_last_msg("EVENTS", "toolbus.evt.breaker.opened")
        assert info.data is not None
    finally:
        await nc.close()
    assert unpack(Event, info.data).detail["failures"] == FAIL_MAX

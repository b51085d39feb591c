"""A saturated worker starts priority-0 calls first, still lets priority-3 through, and skips cancelled waiting calls.

Counts, not timings: the demo server's execution record gives the order in which calls started.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shared.client import ToolbusClient
from shared.config import Config
from shared.embedded import NatsServer, RedisServer
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh, eventually, executions

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PER_LEVEL = 30
SHARE = 0.1  # every 10th start is a starvation turn


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("priorities") / "record.jsonl"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def single_slot(
    nats_server: NatsServer, redis_server: RedisServer, git_repo: Path, record: Path
) -> AsyncIterator[InProcessMesh]:
    """One worker that runs one call at a time, so every call but one waits."""
    base = make_config(git_repo).model_dump(mode="json")
    demo = base["servers"]["demo"] | {"env": {"TOOLBUS_DEMO_RECORD": str(record)}}
    base["servers"] = {"demo": demo}
    base["pools"]["default"].update(concurrency=1, starvation_share=SHARE)
    async with InProcessMesh(nats_server.url, Config.model_validate(base), redis_server.url) as mesh:
        yield mesh


async def started_ids(record: Path) -> list[str]:
    await asyncio.sleep(0)
    return [str(entry["call_id"]) for entry in executions(record)]


async def test_priority_zero_starts_first_and_priority_three_still_progresses(
    single_slot: InProcessMesh, record: Path
) -> None:
    """With low priority queued first, every p0 call starts before the median p3 call, and p3 calls all finish."""
    async with ToolbusClient(single_slot.nats_url, ADMIN_KEY) as client:
        blocker = await client.submit("demo__sleep_ms", {"ms": 1500}, priority=0)
        await eventually(lambda: _has(record, blocker), timeout=20)
        low = [await client.submit("demo__sleep_ms", {"ms": 5}, priority=3) for _ in range(PER_LEVEL)]
        high = [await client.submit("demo__sleep_ms", {"ms": 5}, priority=0) for _ in range(PER_LEVEL)]
        results = await asyncio.gather(*(client.wait_result(c, timeout_s=90) for c in low + high))
    assert all(r.status.value == "ok" for r in results)
    order = {call_id: index for index, call_id in enumerate(await started_ids(record))}
    median_low = statistics.median(order[c] for c in low)
    assert max(order[c] for c in high) < median_low, "every priority-0 call starts before the median priority-3 one"
    low_before_last_high = sum(1 for c in low if order[c] < max(order[c] for c in high))
    assert low_before_last_high >= 1, "the starvation share lets priority 3 start while priority 0 still waits"
    assert low_before_last_high <= PER_LEVEL * SHARE * 2, "but only a bounded share of the starts"


async def test_cancelled_waiting_call_never_runs(single_slot: InProcessMesh, record: Path) -> None:
    """A call cancelled while it waits behind another is answered -32800 when reached and never runs."""
    async with ToolbusClient(single_slot.nats_url, ADMIN_KEY) as client:
        blocker = await client.submit("demo__sleep_ms", {"ms": 1000})
        await eventually(lambda: _has(record, blocker), timeout=20)
        waiting = await client.submit("demo__echo", {"text": "never"})
        await client.cancel(waiting)
        result = await client.wait_result(waiting, timeout_s=30)
    assert result.response.error is not None and result.response.error.code == -32800
    assert waiting not in await started_ids(record)


async def _has(record: Path, call_id: str) -> bool:
    return call_id in await started_ids(record)

"""No accepted call is lost: a worker killed with SIGKILL mid-call hands the call to its successor.

DESIGN.md §8, first guarantee, for the executor; the other kill/restart cases come with the
issues that build the other services.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.router.app import RouterService, RouterSettings
from shared.client import ToolbusClient
from shared.config import Config
from shared.embedded import NatsServer, RedisServer
from shared.mesh import bootstrap
from tests.conftest import ADMIN_KEY
from tests.helpers import ServiceProcessHandle, eventually, work_settled

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module")
async def router(nats_server: NatsServer, mesh_config: Config) -> AsyncIterator[RouterService]:
    await bootstrap(nats_server.url, mesh_config)
    service = RouterService(RouterSettings(nats_server.url, instance="router-chaos"))
    await service.start()
    yield service
    await service.stop()


async def test_executor_killed_mid_call_is_completed_by_its_successor(
    nats_server: NatsServer, redis_server: RedisServer, router: RouterService, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-call: a restarted worker completes it and exactly one result is stored and sent."""
    first = ServiceProcessHandle("services.executor", nats_server.url, tmp_path / "executor-1.log",
                                 "--redis-url", redis_server.url)
    await first.wait_ready()
    nc = await nats.connect(nats_server.url)
    started = await nc.subscribe("toolbus.evt.call.started")
    try:
        async with ToolbusClient(nats_server.url, ADMIN_KEY) as client:
            call_id = await client.submit("demo__sleep_ms", {"ms": 1500})
            results = await nc.subscribe(f"toolbus.result.{call_id}")
            await started.next_msg(timeout=30)  # the first worker now holds the call
            first.kill()
            second = ServiceProcessHandle("services.executor", nats_server.url, tmp_path / "executor-2.log",
                                      "--redis-url", redis_server.url)
            await second.wait_ready()
            result = await client.wait_result(call_id, timeout_s=60)
            assert result.status.value == "ok" and result.text == "slept 1500 ms"

            await eventually(lambda: work_settled(nats_server.url), timeout=30)
            delivered = [json.loads(m.data) async for m in _drain(results)]
        assert len(delivered) == 1, delivered
        assert second.stop() == 0
        finished = [line for line in second.log_lines() if line.get("event") == "call.finished"]
        assert [line["call_id"] for line in finished] == [call_id]
        assert not [line for line in first.log_lines() if line.get("event") == "call.finished"]
    finally:
        await nc.close()


async def _drain(subscription: Subscription) -> AsyncIterator[Msg]:
    """Every message already delivered to a subscription, without waiting for more."""
    while True:
        try:
            yield await subscription.next_msg(timeout=0.2)
        except nats.errors.TimeoutError:
            return
        except asyncio.CancelledError:
            raise

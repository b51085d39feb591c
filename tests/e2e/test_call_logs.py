"""Logs of one call across router and executor processes share its call_id and trace_id."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.client import ToolbusClient
from shared.config import Config
from shared.embedded import NatsServer, RedisServer
from shared.mesh import bootstrap
from shared.telemetry import configure_tracing
from tests.conftest import ALICE_KEY
from tests.helpers import ServiceProcessHandle

pytestmark = [pytest.mark.e2e]


async def test_router_and_executor_logs_share_call_and_trace_ids(
    nats_server: NatsServer, redis_server: RedisServer, mesh_config: Config, tmp_path: Path
) -> None:
    """The producer's trace continues through router and executor, and both log the call under its ids."""
    configure_tracing("e2e-producer")
    await bootstrap(nats_server.url, mesh_config)
    executor = ServiceProcessHandle("services.executor", nats_server.url, tmp_path / "executor.log",
                                    "--redis-url", redis_server.url)
    router = ServiceProcessHandle("services.router", nats_server.url, tmp_path / "router.log")
    try:
        await executor.wait_ready()
        await router.wait_ready()
        async with ToolbusClient(nats_server.url, ALICE_KEY) as client:
            result = await client.call("demo__echo", {"text": "trace me"})
    finally:
        assert router.stop() == 0 and executor.stop() == 0
    trace_id = result.headers["traceparent"].split("-")[1]
    router_lines = [line for line in router.log_lines() if line.get("call_id") == result.call_id]
    executor_lines = [line for line in executor.log_lines() if line.get("call_id") == result.call_id]
    assert {line["event"] for line in router_lines} >= {"call.dispatched"}
    assert {line["event"] for line in executor_lines} >= {"call.finished"}
    assert {line["trace_id"] for line in router_lines + executor_lines} == {trace_id}
    assert all(ALICE_KEY not in str(line) for line in router.log_lines() + executor.log_lines())

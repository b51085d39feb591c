"""The executor restarts crashed backends, dead-letters what keeps failing, and never re-runs a completed call."""

from __future__ import annotations

import os
import signal
import uuid

import nats
import pytest

from shared.client import ToolbusClient
from shared.codec import pack, unpack
from shared.contracts import DeadLetter, WorkItem
from shared.errors import CallFailed
from shared.outcomes import now_ms
from tests.conftest import ADMIN_KEY
from tests.helpers import InProcessMesh, eventually, work_settled

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


async def test_crashed_backend_is_restarted_and_later_calls_succeed(mesh: InProcessMesh) -> None:
    """After the demo server process is killed, the executor starts a new one and calls succeed on it."""
    async with ToolbusClient(mesh.nats_url, ADMIN_KEY) as client:
        first_pid = (await client.call("demo__pid")).structured_content["result"]
        os.kill(first_pid, signal.SIGKILL)
        echoed = await client.call("demo__echo", {"text": "after the crash"})
        second_pid = (await client.call("demo__pid")).structured_content["result"]
    assert echoed.text == "after the crash"
    assert second_pid != first_pid
    assert mesh.executors[0].worker.backends["demo"].restarts >= 1


async def test_call_that_keeps_crashing_its_backend_is_dead_lettered(mesh: InProcessMesh) -> None:
    """A call that kills its backend on every attempt ends dead_lettered (-32060) and lands in the DLQ."""
    async with ToolbusClient(mesh.nats_url, ADMIN_KEY) as client:
        with pytest.raises(CallFailed) as failure:
            await client.call("demo__crash", call_id=(call_id := str(uuid.uuid4())))
        assert failure.value.code == -32060 and failure.value.reason == "dead_lettered"
        assert (await client.call("demo__echo", {"text": "still serving"})).text == "still serving"
    nc = await nats.connect(mesh.nats_url)
    try:
        stored = await nc.jetstream().get_last_msg("DLQ", "toolbus.dlq.default")
        letter = unpack(DeadLetter, stored.data or b"")
    finally:
        await nc.close()
    assert letter.work.call_id == call_id
    assert letter.attempts[-1].attempt == mesh.config.pools["default"].max_deliveries


async def test_completed_call_is_not_executed_again(mesh: InProcessMesh) -> None:
    """A work item whose call already has a stored result is acked without running the tool."""
    async with ToolbusClient(mesh.nats_url, ADMIN_KEY) as client:
        done = await client.call("demo__pid")
        work = WorkItem(call_id=done.call_id, request_id=1, public_tool="demo__crash", server="demo", tool="crash",
                        pool="default", principal="admin", priority=2, accepted_at_ms=now_ms())
        pid_before = done.structured_content["result"]
        nc = await nats.connect(mesh.nats_url)
        try:
            # Publishing the call again as crash: if it ran, the backend would die and restart.
            await nc.jetstream().publish("toolbus.work.default.2", pack(work))

            await eventually(lambda: work_settled(mesh.nats_url))
        finally:
            await nc.close()
        assert (await client.call("demo__pid")).structured_content["result"] == pid_before
        stored = await client.fetch_result(done.call_id)
    assert stored is not None and stored.response == done.response


async def test_fetch_result_finds_a_stored_result_by_call_id(mesh: InProcessMesh) -> None:
    """A producer can submit, disconnect, and later fetch the result by call id from RESULTS."""
    async with ToolbusClient(mesh.nats_url, ADMIN_KEY) as client:
        call_id = await client.submit("demo__echo", {"text": "fetch me later"})
    async with ToolbusClient(mesh.nats_url, ADMIN_KEY) as reconnected:
        result = await reconnected.wait_result(call_id, timeout_s=20)
        missing = await reconnected.fetch_result(str(uuid.uuid4()))
    assert result.text == "fetch me later"
    assert missing is None


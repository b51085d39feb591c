"""A context store SIGKILLed while it files tool results loses none and files none twice.

200 calls carry one `Toolbus-Session`; the context-store process is killed with SIGKILL once some
of their results are filed, and a new one is started. Events it held unacked are redelivered to
the new process; block ids (`call:<call_id>`) make each filing idempotent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.context.tool_results import block_id
from shared.client import ToolbusClient
from shared.contracts.context import BlockType
from shared.embedded import NatsServer, RedisServer
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh, ServiceProcessHandle, eventually

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"ctxchaos{uuid.uuid4().hex[:6]}"
CALLS = 200


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(nats_server: NatsServer, redis_server: RedisServer, git_repo: Path) -> AsyncIterator[InProcessMesh]:
    config = make_config(git_repo, prefix=PREFIX)
    async with InProcessMesh(nats_server.url, config, redis_server.url) as running:
        yield running


def context_process(nats_url: str, redis_url: str, log: Path) -> ServiceProcessHandle:
    return ServiceProcessHandle("services.context", nats_url, log, "--redis-url", redis_url, "--prefix", PREFIX)


async def test_sigkill_of_the_context_store_files_every_result_exactly_once(
        mesh: InProcessMesh, redis_server: RedisServer, tmp_path: Path) -> None:
    """Every one of 200 results is a TOOL block exactly once after the store is SIGKILLed and replaced."""
    first = context_process(mesh.nats_url, redis_server.url, tmp_path / "context-1.log")
    await first.wait_ready()
    second: ServiceProcessHandle | None = None
    try:
        async with ToolbusClient(mesh.nats_url, ADMIN_KEY, prefix=PREFIX, timeout_s=120) as client:
            session = await client.context.create("agent-chaos")
            calls = await asyncio.gather(*(client.submit("demo__echo", {"text": f"result {n}"},
                                                         session=session.session_id) for n in range(CALLS)))

            async def filed(at_least: int) -> int | None:
                blocks = (await client.context.get(session.session_id)).blocks
                count = sum(b.type is BlockType.TOOL for b in blocks)
                return count if count >= at_least else None

            killed_at = await eventually(lambda: filed(CALLS // 5), timeout=60)
            first.kill()
            second = context_process(mesh.nats_url, redis_server.url, tmp_path / "context-2.log")
            await second.wait_ready()
            await eventually(lambda: filed(CALLS), timeout=120)
            final = await client.context.get(session.session_id)
        assert killed_at < CALLS, "the kill must come before every result was filed"
        assert sorted(b.id for b in final.blocks) == sorted(block_id(call_id) for call_id in calls)
        assert final.version == CALLS, "each result was committed once: one version per call"
        texts = {b.metadata["call_id"]: b.content for b in final.blocks}
        assert sorted(texts.values()) == sorted(f"result {n}" for n in range(CALLS))
    finally:
        if second is not None:
            assert second.stop() == 0

"""A streamable-HTTP MCP backend is served like a stdio one: tools registered, calls answered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from shared.client import ToolbusClient
from shared.config import Config
from shared.embedded import NatsServer, RedisServer
from shared.mesh import free_port
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh, eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def http_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo server as its own process, speaking streamable HTTP on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("http") / "demo-http.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "services.demo_tools", "--http", str(port)],
                                   stdout=sink, stderr=sink)
    yield f"http://127.0.0.1:{port}/mcp"
    process.terminate()
    process.wait(timeout=30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http_mesh(
    nats_server: NatsServer, redis_server: RedisServer, git_repo: Path, http_backend: str
) -> AsyncIterator[InProcessMesh]:
    async def listening() -> bool:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(http_backend).port)
        except OSError:
            return False
        writer.close()
        return True

    await eventually(listening, timeout=30)
    base = make_config(git_repo).model_dump(mode="json")
    base["servers"] = {"remote": {"url": http_backend, "headers": {"X-Toolbus-Test": "yes"}, "prefix": "web"}}
    async with InProcessMesh(nats_server.url, Config.model_validate(base), redis_server.url) as mesh:
        yield mesh


async def test_http_backend_tools_are_callable(http_mesh: InProcessMesh) -> None:
    """Tools of an HTTP backend are registered under its prefix and answer through the bus."""
    async with ToolbusClient(http_mesh.nats_url, ADMIN_KEY) as client:
        echoed = await client.call("web__echo", {"text": "over http"})
        failed = await client.call("web__fail", {"message": "http tool error"})
    assert echoed.text == "over http"
    assert failed.status.value == "tool_error" and "http tool error" in failed.text

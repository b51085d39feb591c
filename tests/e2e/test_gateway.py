"""The MCP gateway with the official MCP SDK client over streamable HTTP: the mesh's tools are
listed per role with their real metadata, calls give exactly what a bus call gives, and keys,
roles and origins are enforced.

Router and executor (real demo, git and time MCP servers) and the gateway run in-process against
the module's nats-server, under a prefix of this module's own; the gateway listens on a free port.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import pytest_asyncio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from services.gateway.app import GatewayService, GatewaySettings
from services.router.policy import is_allowed
from shared.bus import connect
from shared.client import CallResult, ToolbusClient
from shared.config import Config
from shared.contracts import ToolSpec
from shared.embedded import NatsServer, RedisServer
from shared.mesh import free_port
from shared.registry import Registry
from tests.conftest import ADMIN_KEY, ALICE_KEY, make_config
from tests.helpers import InProcessMesh, ServiceProcessHandle

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"gw{uuid.uuid4().hex[:8]}"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "probe", "version": "0"}}}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class GatewayMesh:
    """The running mesh, its config, the tools it registered, and the gateway in front of it."""

    def __init__(self, mesh: InProcessMesh, gateway: GatewayService, tools: dict[str, ToolSpec]) -> None:
        self.mesh = mesh
        self.gateway = gateway
        self.tools = tools

    @property
    def config(self) -> Config:
        return self.mesh.config

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(git_repo: Path, nats_server: NatsServer, redis_server: RedisServer) -> AsyncIterator[GatewayMesh]:
    """Mesh and gateway (port 0: any free port), up for the whole module."""
    config = make_config(git_repo, prefix=PREFIX)
    async with InProcessMesh(nats_server.url, config, redis_server.url) as mesh:
        gateway = GatewayService(GatewaySettings(nats_server.url, PREFIX, "gateway-test", port=0))
        await gateway.start()
        try:
            yield GatewayMesh(mesh, gateway, await registered_tools(nats_server.url))
        finally:
            await gateway.stop()


async def registered_tools(nats_url: str) -> dict[str, ToolSpec]:
    """The registry's tools, read directly (what the gateway must list)."""
    nc = await connect(nats_url, name="gateway-test-registry")
    try:
        return await (await Registry.open(nc.jetstream())).tools()
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def mcp_session(url: str, key: str) -> AsyncIterator[ClientSession]:
    """An initialized official-SDK client session to the gateway, sending `Authorization: Bearer <key>`."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def both_ways(running: GatewayMesh, key: str, tool: str, arguments: dict[str, Any]
                    ) -> tuple[types.CallToolResult, CallResult]:
    """The same call through the gateway (MCP) and straight onto the bus (ToolbusClient)."""
    async with mcp_session(running.url, key) as session:
        via_gateway = await session.call_tool(tool, arguments)
    async with ToolbusClient(running.mesh.nats_url, key, prefix=PREFIX) as client:
        via_bus = await client.call(tool, arguments, raise_on_error=False)
    assert isinstance(via_gateway, types.CallToolResult)
    return via_gateway, via_bus


def wire(result: types.CallToolResult) -> dict[str, Any]:
    """A result as it travels as JSON (camelCase, unset fields absent), comparable with a bus result."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def assert_same_result(via_gateway: types.CallToolResult, via_bus: CallResult) -> None:
    """Field by field (content items, structuredContent, isError, _meta, …) the result is the bus result."""
    assert via_bus.response.error is None, via_bus.response.error
    gateway, bus = wire(via_gateway), via_bus.result
    assert set(gateway) == set(bus)
    for name in bus:
        assert gateway[name] == bus[name], name


async def test_tools_list_shows_only_what_the_callers_role_allows(running: GatewayMesh) -> None:
    """Alice (analyst) sees exactly the registered tools her role allows, so never `demo__crash`."""
    async with mcp_session(running.url, ALICE_KEY) as session:
        listed = [tool.name for tool in (await session.list_tools()).tools]
    alice = next(p for p in running.config.principals if p.name == "alice")
    expected = sorted(name for name in running.tools if is_allowed(alice, running.config.roles, name))
    assert listed == expected
    assert "demo__crash" not in listed
    assert "git__git_commit" not in listed and "git__git_status" in listed


async def test_admin_sees_every_registered_tool(running: GatewayMesh) -> None:
    """The admin role allows `*`, so the gateway lists the whole registry, `demo__crash` included."""
    async with mcp_session(running.url, ADMIN_KEY) as session:
        listed = {tool.name for tool in (await session.list_tools()).tools}
    assert listed == set(running.tools)
    assert "demo__crash" in listed


async def test_listed_tools_carry_the_backends_own_metadata(running: GatewayMesh) -> None:
    """Title, description, inputSchema, outputSchema and annotations are the registry's, unchanged."""
    async with mcp_session(running.url, ADMIN_KEY) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
    for name, spec in running.tools.items():
        tool = listed[name]
        annotations = tool.annotations.model_dump(mode="json", by_alias=True, exclude_none=True) \
            if tool.annotations else None
        assert (tool.title, tool.description) == (spec.title, spec.description), name
        assert tool.input_schema == spec.input_schema, name
        assert tool.output_schema == spec.output_schema, name
        assert annotations == spec.annotations, name
    assert any(spec.output_schema for spec in running.tools.values()), "no tool exercises outputSchema"
    assert any(spec.annotations for spec in running.tools.values()), "no tool exercises annotations"


async def test_demo_echo_gives_what_a_bus_call_gives(running: GatewayMesh) -> None:
    """`demo__echo` through the gateway equals the same bus call, content and structuredContent alike."""
    via_gateway, via_bus = await both_ways(running, ALICE_KEY, "demo__echo", {"text": "through the gateway"})
    assert_same_result(via_gateway, via_bus)
    assert "through the gateway" in via_bus.text


async def test_git_status_gives_what_a_bus_call_gives(running: GatewayMesh, git_repo: Path) -> None:
    """`git__git_status` (mcp-server-git) through the gateway equals the same bus call."""
    via_gateway, via_bus = await both_ways(running, ALICE_KEY, "git__git_status", {"repo_path": str(git_repo)})
    assert_same_result(via_gateway, via_bus)
    assert "main" in via_bus.text


async def test_current_time_gives_what_a_bus_call_gives(running: GatewayMesh) -> None:
    """`time__get_current_time` through the gateway equals the same bus call field by field, the clock aside."""
    via_gateway, via_bus = await both_ways(running, ALICE_KEY, "time__get_current_time", {"timezone": "UTC"})
    gateway, bus = wire(via_gateway), via_bus.result
    # The two calls ran moments apart: the time read differs a little, everything else must not.
    moment_gateway, moment_bus = gateway["structuredContent"]["datetime"], bus["structuredContent"]["datetime"]
    assert abs((datetime.fromisoformat(moment_bus) - datetime.fromisoformat(moment_gateway)).total_seconds()) < 10
    gateway, bus = without(gateway, moment_gateway), without(bus, moment_bus)
    assert set(gateway) == set(bus)
    for name in bus:
        assert gateway[name] == bus[name], name
    assert '"timezone": "UTC"' in json.dumps(gateway["structuredContent"])


def without(result: dict[str, Any], moment: str) -> dict[str, Any]:
    """A result with its time reading (in structuredContent and in the text) replaced by a placeholder."""
    replaced: dict[str, Any] = json.loads(json.dumps(result).replace(moment, "<now>"))
    return replaced


async def test_a_tool_error_passes_through_as_is_error(running: GatewayMesh) -> None:
    """A tool's own failure reaches the client as a result with isError, not as a protocol error."""
    via_gateway, via_bus = await both_ways(running, ALICE_KEY, "demo__fail", {"message": "no luck"})
    assert_same_result(via_gateway, via_bus)
    assert via_gateway.is_error is True


async def test_a_forbidden_tool_called_anyway_is_refused_by_the_router(running: GatewayMesh) -> None:
    """Alice calling the unlisted `demo__crash` gets the router's forbidden error (-32003) with its call id."""
    async with mcp_session(running.url, ALICE_KEY) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool("demo__crash", {})
    assert refused.value.code == -32003
    assert refused.value.data["reason"] == "forbidden"
    assert refused.value.data["call_id"], "the refusal must come from the bus, which names the call"


async def test_an_unknown_tool_is_refused_with_the_bus_code(running: GatewayMesh) -> None:
    """A tool no backend has gets the bus's unknown_tool error (-32601) and its message."""
    async with mcp_session(running.url, ADMIN_KEY) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool("demo__no_such_tool", {})
    assert refused.value.code == -32601
    assert refused.value.data["reason"] == "unknown_tool"
    assert "demo__no_such_tool" in refused.value.message


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", f"Basic {ALICE_KEY}", "Bearer"],
                         ids=["missing", "wrong", "not-bearer", "scheme-only"])
async def test_a_request_without_a_valid_key_gets_401(running: GatewayMesh, authorization: str | None) -> None:
    """No key, an unknown key or another scheme is answered HTTP 401 with a Bearer `WWW-Authenticate`."""
    headers = dict(MCP_ACCEPT) | ({"Authorization": authorization} if authorization else {})
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(running.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")


async def test_a_valid_key_is_let_through(running: GatewayMesh) -> None:
    """The same probe with Alice's key is answered 200, so the 401s above are about the key alone."""
    headers = MCP_ACCEPT | {"Authorization": f"Bearer {ALICE_KEY}"}
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(running.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 200


async def test_a_cross_origin_request_is_refused(running: GatewayMesh) -> None:
    """A browser page from another origin cannot use the gateway, even with a valid key (DNS rebinding)."""
    headers = MCP_ACCEPT | {"Authorization": f"Bearer {ALICE_KEY}", "Origin": "http://evil.example"}
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(running.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 403


async def test_the_gateway_process_serves_and_drains_on_sigterm(running: GatewayMesh, tmp_path: Path) -> None:
    """`python -m services.gateway` serves MCP on its `--port`, and SIGTERM stops it cleanly (exit 0)."""
    port = free_port()
    process = ServiceProcessHandle("services.gateway", running.mesh.nats_url, tmp_path / "gateway.log",
                                   "--prefix", PREFIX, "--port", str(port))
    try:
        await process.wait_ready()
        async with mcp_session(f"http://127.0.0.1:{port}/mcp", ALICE_KEY) as session:
            echoed = await session.call_tool("demo__echo", {"text": "from a process"})
        assert isinstance(echoed, types.CallToolResult)
        assert echoed.structured_content == {"result": "from a process"}
    finally:
        exit_code = process.stop()
    assert exit_code == 0, (tmp_path / "gateway.log").read_text()[-3000:]

"""The MCP gateway with the official MCP SDK client over streamable HTTP: the mesh's tools are
listed per role with their real metadata, calls give exactly what a bus call gives, and keys,
roles and origins are enforced.

Router and executor (real demo, git and time MCP servers) and the gateway run in-process against
the module's nats-server, under a prefix of this module's own; the gateway listens on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import pytest_asyncio
from mcp import Client, ClientSession
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from services.demo_tools.server import RECORD_ENV
from services.gateway.app import GatewayService, GatewaySettings
from shared.bus import connect
from shared.client import CallResult, ToolbusClient
from shared.config import Config
from shared.contracts import CallStatus, ToolSpec
from shared.embedded import NatsServer, RedisServer
from shared.mesh import free_port
from shared.policy import is_allowed
from shared.registry import Registry
from tests.conftest import ADMIN_KEY, ALICE_KEY, make_config
from tests.helpers import TOOLBUS, InProcessMesh, ServiceProcessHandle, eventually

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


@pytest.fixture(scope="module")
def execution_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the demo server writes a line per tool run (and one when `sleep_ms` finishes)."""
    return tmp_path_factory.mktemp("gateway") / "executions.jsonl"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(git_repo: Path, nats_server: NatsServer, redis_server: RedisServer, execution_record: Path,
                  ) -> AsyncIterator[GatewayMesh]:
    """Mesh and gateway (port 0: any free port), up for the whole module. The analyst role is
    denied the demo's readme resource, so resources are filtered and refused like tools."""
    base = make_config(git_repo)
    servers = base.model_dump(mode="json")["servers"]
    servers["demo"]["env"] = {RECORD_ENV: str(execution_record)}
    roles = base.model_dump(mode="json")["roles"]
    roles["analyst"]["deny"] = ["demo__crash", "demo__readme"]
    config = make_config(git_repo, prefix=PREFIX, servers=servers, roles=roles)
    async with InProcessMesh(nats_server.url, config, redis_server.url, gateway=True) as mesh:
        yield GatewayMesh(mesh, mesh.gateway, await registered_tools(nats_server.url))


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


@contextlib.asynccontextmanager
async def mcp_client(url: str, key: str) -> AsyncIterator[Client]:
    """The official SDK's high-level `Client` (2026-07-28 protocol) to the gateway, with Alice's or the admin's key."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


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


# --- acceptance 1: the same results as the backends give when called directly ------------------


async def call_directly(config: Config, server: str, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
    """The tool called on its backend server itself (a fresh stdio session, no toolbus in between)."""
    backend = config.servers[server]
    assert backend.command is not None
    target = StdioServerParameters(command=backend.command, args=backend.args, env=backend.env or None)
    async with Client(target) as client:
        return await client.call_tool(tool, arguments)


@pytest.mark.parametrize(("public", "server", "tool", "arguments"), [
    ("demo__echo", "demo", "echo", {"text": "same either way"}),
    ("git__git_log", "git", "git_log", {"repo_path": "<repo>", "max_count": 3}),
    ("git__git_status", "git", "git_status", {"repo_path": "<repo>"}),
    ("time__convert_time", "time", "convert_time",
     {"source_timezone": "UTC", "time": "12:30", "target_timezone": "Asia/Tokyo"}),
], ids=["demo-echo", "git-log", "git-status", "time-convert"])
async def test_gateway_results_equal_calling_the_backend_directly(
    running: GatewayMesh, git_repo: Path, public: str, server: str, tool: str, arguments: dict[str, Any]
) -> None:
    """Acceptance 1: through the gateway (2026-07-28 `Client`) each result equals, field by field, the
    result the backend server gives a direct MCP client, except the backend's own serverInfo `_meta`."""
    arguments = {k: str(git_repo) if v == "<repo>" else v for k, v in arguments.items()}
    async with mcp_client(running.url, ALICE_KEY) as client:
        via_gateway = wire(await client.call_tool(public, arguments))
    direct = wire(await call_directly(running.config, server, tool, arguments))
    assert via_gateway.get("isError") is not True, via_gateway
    assert without_server_info(via_gateway) == without_server_info(direct)
    assert via_gateway["content"], "an empty result would make the comparison vacuous"


def without_server_info(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the SDK's `_meta` serverInfo stamp (the gateway's differs from the backend's)."""
    meta = {k: v for k, v in result.get("_meta", {}).items() if k != "io.modelcontextprotocol/serverInfo"}
    return {k: v for k, v in result.items() if k != "_meta"} | ({"_meta": meta} if meta else {})


# --- progress and cancellation ------------------------------------------------------------------


async def test_progress_notifications_reach_the_client_before_the_result(running: GatewayMesh) -> None:
    """Acceptance 3: `demo__progress` reports 5 steps; all of them reach the MCP client, in order, before the result."""
    seen: list[tuple[float, float | None, str | None]] = []
    result_arrived = False

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert not result_arrived, "progress after the result"
        seen.append((progress, total, message))

    async with mcp_client(running.url, ALICE_KEY) as client:
        result = await client.call_tool("demo__progress", {"steps": 5, "delay_ms": 30}, progress_callback=on_progress)
        result_arrived = True
    assert len(seen) >= 3
    assert seen == [(step, 5, f"step {step} of 5") for step in range(1, 6)]
    assert wire(result)["content"][0]["text"] == "done after 5 steps"


async def test_progress_reaches_a_legacy_session_too(running: GatewayMesh) -> None:
    """The same over the 2025-11-25 handshake (`ClientSession.initialize`), which older clients speak."""
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with mcp_session(running.url, ALICE_KEY) as session:
        await session.call_tool("demo__progress", {"steps": 3, "delay_ms": 30}, progress_callback=on_progress)
    assert seen == [1, 2, 3]


def sleep_runs(record: Path) -> dict[str, set[str]]:
    """call id → what the demo server recorded of its `sleep_ms` run (`sleep_ms`, `sleep_ms.finished`)."""
    runs: dict[str, set[str]] = {}
    lines = record.read_text().splitlines() if record.exists() else []
    for line in map(json.loads, lines):
        if line["tool"].startswith("sleep_ms") and line["call_id"]:
            runs.setdefault(line["call_id"], set()).add(line["tool"])
    return runs


async def test_cancelling_a_running_call_stops_it_and_frees_its_worker(
    running: GatewayMesh, execution_record: Path
) -> None:
    """Acceptance 4: the client gives up on `demo__sleep_ms` while it runs; the bus call ends `cancelled`,
    the tool never finishes (the demo server's record has no `sleep_ms.finished` for it, even after the
    sleep would have ended), and the worker has nothing left running."""
    before = set(sleep_runs(execution_record))
    worker = running.mesh.executors[0].worker
    async with mcp_client(running.url, ALICE_KEY) as client:
        call = asyncio.create_task(client.call_tool("demo__sleep_ms", {"ms": 2500}))
        started = await eventually(lambda: asyncio.sleep(0, set(sleep_runs(execution_record)) - before or None))
        (call_id,) = started
        assert worker.running, "the call should be running on the worker"
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    async with ToolbusClient(running.mesh.nats_url, ALICE_KEY, prefix=PREFIX) as bus:
        outcome = await bus.wait_result(call_id, timeout_s=10)
    assert outcome.status == CallStatus.FAILED
    assert outcome.response.error is not None and outcome.response.error.code == -32800
    await eventually(lambda: asyncio.sleep(0, not worker.running or None))
    await asyncio.sleep(3.0)  # past the end of the 2.5 s sleep, had it gone on
    assert sleep_runs(execution_record)[call_id] == {"sleep_ms"}, "the tool finished although it was cancelled"


# --- prompts and resources ----------------------------------------------------------------------


async def test_prompts_are_listed_namespaced_and_got_over_the_bus(running: GatewayMesh) -> None:
    """`demo__review` is listed with the backend's own arguments and gives what the backend gives."""
    async with mcp_client(running.url, ALICE_KEY) as client:
        listed = {prompt.name: prompt for prompt in (await client.list_prompts()).prompts}
        got = await client.get_prompt("demo__review", {"code": "x = 1", "language": "python"})
    review = listed["demo__review"]
    assert review.title == "Code review"
    assert [(a.name, a.required) for a in review.arguments or []] == [("code", True), ("language", False)]
    async with Client(demo_app()) as direct:
        expected = await direct.get_prompt("review", {"code": "x = 1", "language": "python"})
    assert [m.model_dump() for m in got.messages] == [m.model_dump() for m in expected.messages]
    assert got.description == expected.description


async def test_a_prompt_without_its_required_argument_is_refused(running: GatewayMesh) -> None:
    """The router checks a prompt's required arguments as it checks a tool's schema (-32602)."""
    async with mcp_client(running.url, ALICE_KEY) as client:
        with pytest.raises(MCPError) as refused:
            await client.get_prompt("demo__review", {"language": "go"})
    assert refused.value.code == -32602
    assert "code" in refused.value.message


async def test_resources_and_templates_are_listed_per_role_and_read_over_the_bus(running: GatewayMesh) -> None:
    """The admin sees the readme and the echo template; a read of either equals the backend's own."""
    async with mcp_client(running.url, ADMIN_KEY) as client:
        resources = {r.uri: r for r in (await client.list_resources()).resources}
        templates = {t.uri_template: t for t in (await client.list_resource_templates()).resource_templates}
        readme = await client.read_resource("demo://readme")
        echoed = await client.read_resource("demo://echo/hello-gateway")
    assert resources["demo://readme"].name == "demo__readme"
    assert resources["demo://readme"].mime_type == "text/markdown"
    assert templates["demo://echo/{text}"].name == "demo__echo_resource"
    async with Client(demo_app()) as direct:
        expected_readme = await direct.read_resource("demo://readme")
        expected_echo = await direct.read_resource("demo://echo/hello-gateway")
    assert [c.model_dump() for c in readme.contents] == [c.model_dump() for c in expected_readme.contents]
    assert [c.model_dump() for c in echoed.contents] == [c.model_dump() for c in expected_echo.contents]
    assert echoed.contents[0].text == "hello-gateway"  # type: ignore[union-attr]


async def test_a_denied_resource_is_unlisted_and_refused(running: GatewayMesh) -> None:
    """Alice's role denies `demo__readme`: it is not listed for her, and reading it anyway is forbidden."""
    async with mcp_client(running.url, ALICE_KEY) as client:
        uris = {r.uri for r in (await client.list_resources()).resources}
        with pytest.raises(MCPError) as refused:
            await client.read_resource("demo://readme")
        allowed = await client.read_resource("demo://echo/still-allowed")
    assert "demo://readme" not in uris
    assert refused.value.code == -32003 and refused.value.data["reason"] == "forbidden"
    assert allowed.contents[0].text == "still-allowed"  # type: ignore[union-attr]


async def test_an_unknown_resource_is_refused_with_the_bus_code(running: GatewayMesh) -> None:
    async with mcp_client(running.url, ADMIN_KEY) as client:
        with pytest.raises(MCPError) as refused:
            await client.read_resource("nowhere://nothing")
    assert refused.value.code == -32601
    assert "nowhere://nothing" in refused.value.message


def demo_app() -> Any:
    from services.demo_tools.server import app  # noqa: PLC0415  # the demo server in-process, for direct reads

    return app


# --- list_changed --------------------------------------------------------------------------------


async def test_a_registry_change_is_announced_to_listening_clients(running: GatewayMesh) -> None:
    """A tool registered (as an executor would) is announced with `tools/list_changed` and listed;
    deleted, it is announced again and gone from the list."""
    spec = next(iter(running.tools.values())).model_copy(update={"public_name": "demo__announced", "tool": "echo"})
    nc = await connect(running.mesh.nats_url, name="gateway-test-announce")
    registry = await Registry.open(nc.jetstream())
    try:
        async with mcp_client(running.url, ADMIN_KEY) as client, client.listen(tools_list_changed=True) as changes:
            events = aiter(changes)
            await registry.put_tool(spec)
            await asyncio.wait_for(anext(events), 10)
            assert "demo__announced" in {t.name for t in (await client.list_tools()).tools}
            await registry.remove_stale(spec.server, {k for k in await registry_keys(registry) if "announced" not in k})
            await asyncio.wait_for(anext(events), 10)
            assert "demo__announced" not in {t.name for t in (await client.list_tools()).tools}
    finally:
        await nc.close()


async def registry_keys(registry: Registry) -> set[str]:
    return {f"tools.{name}" for name in await registry.tools()} | set(await registry.catalog())


# --- stdio -----------------------------------------------------------------------------------------


def stdio_gateway(running: GatewayMesh, key: str) -> StdioServerParameters:
    """`toolbus gateway --stdio` as an MCP client launches it: the key in the environment, the mesh by URL."""
    env = {**os.environ, "TOOLBUS_API_KEY": key, "TOOLBUS_NATS_URL": running.mesh.nats_url, "TOOLBUS_PREFIX": PREFIX}
    return StdioServerParameters(command=TOOLBUS[0], args=[*TOOLBUS[1:], "gateway", "--stdio"], env=env)


async def test_stdio_gateway_lists_per_role_and_calls_with_the_environment_key(running: GatewayMesh) -> None:
    """Over stdio the key comes from TOOLBUS_API_KEY: Alice's role filters the list and her call runs on the bus."""
    async with Client(stdio_gateway(running, ALICE_KEY)) as client:
        listed = {tool.name for tool in (await client.list_tools()).tools}
        echoed = await client.call_tool("demo__echo", {"text": "over stdio"})
        with pytest.raises(MCPError) as refused:
            await client.call_tool("demo__crash", {})
    assert "demo__echo" in listed and "demo__crash" not in listed
    assert echoed.structured_content == {"result": "over stdio"}
    assert refused.value.code == -32003


async def test_stdio_gateway_refuses_an_unknown_key_at_once(running: GatewayMesh) -> None:
    """A wrong key ends the process with exit code 2 and says why on stderr, before any client waits on it."""
    params = stdio_gateway(running, "not-a-key")
    done = await asyncio.to_thread(subprocess.run, [params.command, *params.args], env=params.env,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown API key" in done.stderr
    assert done.stdout == "", "stdout is the MCP channel: nothing else may be written there"


async def test_a_request_body_over_the_limit_gets_413(running: GatewayMesh) -> None:
    """A body larger than `max_request_body_bytes` is refused with HTTP 413 before any MCP work, key or not."""
    limit = GatewaySettings("nats://unused").max_request_body_bytes
    huge = json.loads(json.dumps(INITIALIZE))
    huge["params"]["padding"] = "x" * (limit + 1)
    headers = MCP_ACCEPT | {"Authorization": f"Bearer {ALICE_KEY}"}
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(running.url, json=huge, headers=headers)
    assert response.status_code == 413

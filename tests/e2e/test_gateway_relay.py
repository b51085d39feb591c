"""What a running tool sends its caller, through the mesh and the MCP gateway: log lines, and the
questions it asks of the caller's LLM (sampling) and user (elicitation).

The backend is the conformance fixture server (`services/conformance_backend`), twice: served in
the executor's process (`inproc__*`: its requests run in the call's own task) and as a stdio
subprocess (`piped__*`: everything arrives on the session's read loop, so log lines are pinned
to their call by the per-request opt-in). Clients are the official SDK's, over streamable HTTP.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import pytest_asyncio
from mcp import Client, ClientSession
from mcp.client.context import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import LOG_LEVEL_META_KEY

from shared.client import ToolbusClient
from shared.embedded import NatsServer, RedisServer
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh

pytestmark = [
    pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"),
    # the in-process fixture server logs and samples on purpose: deprecated at 2026-07-28, not gone
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]

PREFIX = f"gwr{uuid.uuid4().hex[:8]}"
FIXTURE = "services.conformance_backend.server:app"
BACKENDS = ["inproc", "piped"]
LOG_LINES = ["Tool execution started", "Tool processing data", "Tool execution completed"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway_url(git_repo: Path, nats_server: NatsServer, redis_server: RedisServer) -> AsyncIterator[str]:
    """A mesh whose backends are the fixture server in-process and over stdio, and a gateway in front."""
    module, _, name = FIXTURE.partition(":")
    servers = make_config(git_repo).model_dump(mode="json")["servers"] | {
        "inproc": {"app": FIXTURE},
        "piped": {"command": sys.executable, "args": ["-c", f"from {module} import {name}; {name}.run()"]},
    }
    config = make_config(git_repo, prefix=PREFIX, servers=servers)
    async with InProcessMesh(nats_server.url, config, redis_server.url, gateway=True) as mesh:
        yield mesh.gateway.url


@contextlib.asynccontextmanager
async def legacy_session(url: str, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """A 2025-11-25 SDK session to the gateway with the admin's key and the given client callbacks."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, **callbacks) as session,
    ):
        await session.initialize()
        yield session


class Logs:
    """The log lines a client received, and whether any came after the call's result."""

    def __init__(self) -> None:
        self.lines: list[types.LoggingMessageNotificationParams] = []
        self.result_arrived = False
        self.late = 0

    async def __call__(self, params: types.LoggingMessageNotificationParams) -> None:
        self.late += self.result_arrived
        self.lines.append(params)

    @property
    def data(self) -> list[Any]:
        return [line.data for line in self.lines]


# --- log lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_log_lines_reach_a_session_that_set_a_level(gateway_url: str, backend: str) -> None:
    """After `logging/setLevel`, the tool's three info lines reach the client, in order, before its result."""
    logs = Logs()
    async with legacy_session(gateway_url, logging_callback=logs) as session:
        await session.set_logging_level("debug")
        result = await session.call_tool(f"{backend}__test_tool_with_logging", {})
        logs.result_arrived = True
    assert not result.is_error
    assert logs.data == LOG_LINES
    assert {line.level for line in logs.lines} == {"info"}
    assert logs.late == 0


async def test_no_log_lines_reach_a_session_that_set_no_level(gateway_url: str) -> None:
    """Without `logging/setLevel` the call asks the backend for no log lines, and none arrive."""
    logs = Logs()
    async with legacy_session(gateway_url, logging_callback=logs) as session:
        result = await session.call_tool("inproc__test_tool_with_logging", {})
    assert not result.is_error
    assert logs.lines == []


async def test_log_lines_below_the_sessions_level_are_not_sent(gateway_url: str) -> None:
    """A session at `warning` gets none of the tool's `info` lines."""
    logs = Logs()
    async with legacy_session(gateway_url, logging_callback=logs) as session:
        await session.set_logging_level("warning")
        await session.call_tool("piped__test_tool_with_logging", {})
    assert logs.lines == []


async def test_a_2026_client_opts_in_to_log_lines_per_request(gateway_url: str) -> None:
    """A 2026-07-28 client asks with `_meta` logLevel; the gateway forwards it and relays the lines."""
    logs = Logs()
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http,
        Client(streamable_http_client(gateway_url, http_client=http), logging_callback=logs, log_level="info")
        as client,
    ):
        result = await client.call_tool("piped__test_tool_with_logging", {})
    assert not result.is_error
    assert logs.data == LOG_LINES


# --- sampling and elicitation -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sampling_is_answered_by_the_mcp_client(gateway_url: str, backend: str) -> None:
    """The tool's `sampling/createMessage` reaches the client's sampling callback; its answer reaches the tool."""
    asked: list[types.CreateMessageRequestParams] = []

    async def sample(context: ClientRequestContext, params: types.CreateMessageRequestParams,
                     ) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="forty-two"),
                                         model="test-model", stop_reason="endTurn")

    async with legacy_session(gateway_url, sampling_callback=sample) as session:
        result = await session.call_tool(f"{backend}__test_sampling", {"prompt": "What is six times seven?"})
    assert not result.is_error, result
    assert result.content[0].text == "LLM response: forty-two"  # type: ignore[union-attr]
    assert len(asked) == 1
    assert asked[0].messages[0].content.text == "What is six times seven?"  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_elicitation_is_answered_by_the_mcp_client(gateway_url: str, backend: str) -> None:
    """The tool's `elicitation/create` reaches the client's elicitation callback with its message and form."""
    asked: list[types.ElicitRequestParams] = []

    async def elicit(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="accept", content={"username": "ada", "email": "ada@example.com"})

    async with legacy_session(gateway_url, elicitation_callback=elicit) as session:
        result = await session.call_tool(f"{backend}__test_elicitation", {"message": "Who are you?"})
    assert not result.is_error, result
    assert result.content[0].text == (  # type: ignore[union-attr]
        'User response: action=accept, content={"username": "ada", "email": "ada@example.com"}')
    assert [params.message for params in asked] == ["Who are you?"]
    form = asked[0]
    assert isinstance(form, types.ElicitRequestFormParams)
    assert set(form.requested_schema["properties"]) == {"username", "email"}


async def test_a_client_that_cannot_sample_gets_an_error_not_a_hang(gateway_url: str) -> None:
    """Without a sampling callback the client declares no capability, the gateway does not offer to
    answer, and the backend's request fails at once: the call ends with a backend error saying why."""
    async with legacy_session(gateway_url) as session:
        with pytest.raises(MCPError) as failed:
            await session.call_tool("inproc__test_sampling", {"prompt": "anyone?"})
    assert failed.value.code == -32603
    assert failed.value.data["reason"] == "backend_error"
    assert "cannot answer sampling/createMessage" in failed.value.message


# --- the same over the bus, without the gateway -------------------------------------------------


async def test_a_bus_caller_answers_questions_and_follows_log_lines(nats_server: NatsServer, gateway_url: str,
                                                                    ) -> None:
    """`ToolbusClient.call(on_input=, on_log=)`: the SDK caller answers the tool's question itself."""
    asked: list[tuple[str, dict[str, Any]]] = []
    logged: list[dict[str, Any]] = []

    async def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
        asked.append((method, params))
        return {"role": "assistant", "content": {"type": "text", "text": "from the bus"}, "model": "m"}

    async def on_log(params: dict[str, Any]) -> None:
        logged.append(params)

    async with ToolbusClient(nats_server.url, ADMIN_KEY, prefix=PREFIX) as client:
        sampled = await client.call("piped__test_sampling", {"prompt": "hi"}, on_input=answer)
        logging = await client.call("piped__test_tool_with_logging", meta={LOG_LEVEL_META_KEY: "info"}, on_log=on_log)
        unanswered = await client.call("piped__test_sampling", {"prompt": "hi"}, raise_on_error=False)
    assert sampled.text == "LLM response: from the bus"
    assert [method for method, _ in asked] == ["sampling/createMessage"]
    assert asked[0][1]["messages"][0]["content"]["text"] == "hi"
    assert not logging.is_error
    assert [line["data"] for line in logged] == LOG_LINES
    assert unanswered.is_error and "cannot answer sampling/createMessage" in unanswered.text


async def test_a_2026_client_is_told_the_gateway_cannot_relay_its_answers_yet(gateway_url: str) -> None:
    """A 2026-07-28 connection has no back-channel mid-call (it would need an InputRequiredResult
    round trip): its sampling callback is never asked, and the call fails with the reason."""
    asked: list[types.CreateMessageRequestParams] = []

    async def sample(context: ClientRequestContext, params: types.CreateMessageRequestParams,
                     ) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="x"),
                                         model="m")

    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http,
        Client(streamable_http_client(gateway_url, http_client=http), sampling_callback=sample) as client,
    ):
        with pytest.raises(MCPError) as failed:
            await client.call_tool("inproc__test_sampling", {"prompt": "hi"})
    assert asked == []
    assert "cannot take sampling/createMessage in the middle of a call" in failed.value.message

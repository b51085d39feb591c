"""An executor's watch on a backend's listed resources (`services/executor/watch.py`), against real
MCP servers served in-process: the demo server on 2026-07-28 (`subscriptions/listen`), and a
low-level server on the 2025-11-25 handshake (`resources/subscribe`, updates as notifications)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
import pytest
from mcp import Client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from services.demo_tools.server import NOTES_URI
from services.demo_tools.server import app as demo_app
from services.executor.watch import ResourceWatch

pytestmark = pytest.mark.integration

WATCHED = "test://watched"
REFUSED = "test://refused"  # the legacy server refuses to subscribe to it
WAIT_S = 10.0


class Published:
    """The `UpdateSink` under test: every `(server, uri)` the watch published."""

    def __init__(self) -> None:
        self.updates: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def __call__(self, server: str, uri: str) -> None:
        self.updates.put_nowait((server, uri))


def listing(*uris: str) -> Callable[[], Awaitable[list[str]]]:
    async def listed() -> list[str]:
        return list(uris)

    return listed


async def test_a_2026_session_publishes_updates_from_its_listen_stream() -> None:
    """On the demo server's 2026-07-28 session, `note` changing `demo://notes` is published as
    `("demo", "demo://notes")`. Notes are left until one is heard: the stream opens in the background."""
    published = Published()
    watch = ResourceWatch("demo", published)
    async with Client(demo_app) as client:
        assert client.protocol_version == "2026-07-28"
        watch.start(client, listing(NOTES_URI))
        try:
            update = await _first_update(published, lambda: client.call_tool("note", {"text": "watched"}))
        finally:
            await watch.stop()
    assert update == ("demo", NOTES_URI)


async def _first_update(published: Published, change: Callable[[], Awaitable[Any]]) -> tuple[str, str]:
    """Make the change until an update is published (bounded): the first tells the watch is live."""
    async with asyncio.timeout(WAIT_S):
        while True:
            await change()
            try:
                return await asyncio.wait_for(published.updates.get(), 0.2)
            except TimeoutError:
                continue


# --- the 2025-11-25 handshake ---------------------------------------------------------------------


class LegacyBackend:
    """A handshake-era server that lists two resources, takes subscriptions to one of them, and
    tells its client of an update when the `touch` tool is called."""

    def __init__(self, *, subscriptions: bool = True) -> None:
        self.subscribed: set[str] = set()
        handlers: dict[str, Any] = {"on_subscribe_resource": self._subscribe} if subscriptions else {}
        self.server: Server[Any] = Server(
            "legacy", on_list_resources=self._list_resources, on_list_tools=self._list_tools,
            on_call_tool=self._call_tool, **handlers)

    async def _list_resources(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None,
                              ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[types.Resource(name=uri, uri=uri) for uri in (WATCHED, REFUSED)])

    async def _subscribe(self, ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams,
                         ) -> types.EmptyResult:
        if params.uri == REFUSED:
            raise MCPError(types.INVALID_PARAMS, "not this one")
        self.subscribed.add(params.uri)
        return types.EmptyResult()

    async def _list_tools(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None,
                          ) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {"uri": {"type": "string"}}}
        return types.ListToolsResult(tools=[types.Tool(name="touch", input_schema=schema)])

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams,
                         ) -> types.CallToolResult:
        await ctx.session.send_resource_updated((params.arguments or {})["uri"])
        return types.CallToolResult(content=[types.TextContent(type="text", text="touched")])


async def test_a_2025_session_subscribes_to_each_listed_uri_and_publishes_its_updates() -> None:
    """Each listed URI gets `resources/subscribe` (one refused leaves the other watched), and the
    server's `notifications/resources/updated` is published for what was subscribed only."""
    legacy = LegacyBackend()
    published = Published()
    watch = ResourceWatch("legacy", published)
    async with Client(legacy.server, mode="legacy", message_handler=watch.on_message) as client:
        subscribing = watch.start(client, listing(WATCHED, REFUSED))
        try:
            await asyncio.wait_for(subscribing, WAIT_S)  # on this era the task ends once it has subscribed
            await client.call_tool("touch", {"uri": REFUSED})  # not subscribed: must not be published
            await client.call_tool("touch", {"uri": WATCHED})  # notifications arrive in order: this one after
            update = await asyncio.wait_for(published.updates.get(), WAIT_S)
        finally:
            await watch.stop()
    assert legacy.subscribed == {WATCHED}
    assert update == ("legacy", WATCHED)


async def test_a_server_that_cannot_tell_of_updates_is_not_asked() -> None:
    """Without `resources.subscribe` the watch does nothing, not even list the resources."""
    backend = LegacyBackend(subscriptions=False)
    asked = asyncio.Event()

    async def listed() -> list[str]:
        asked.set()
        return [WATCHED]

    watch = ResourceWatch("legacy", Published())
    async with Client(backend.server, mode="legacy", message_handler=watch.on_message) as client:
        assert client.server_capabilities.resources is not None
        assert not client.server_capabilities.resources.subscribe
        await asyncio.wait_for(watch.start(client, listed), WAIT_S)  # it ends by itself
        await watch.stop()
    assert not asked.is_set()

"""Resource subscriptions through the MCP gateway, end to end: a tool changes `demo://notes` on the
demo server (a real stdio MCP server behind a real executor), the executor hears of it on its
backend session and publishes it on the bus, and the gateway tells the MCP clients watching it,
on the 2025-11-25 wire (`resources/subscribe`) and on 2026-07-28 (`subscriptions/listen`).

Router, executor and gateway run in-process against the module's nats-server, under a prefix of
this module's own. Alice's role is denied `demo__readme`, so watching is refused as reading is.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import mcp_types as types
import pytest
import pytest_asyncio
from mcp import ClientSession
from mcp.client import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourceUpdated

from services.demo_tools.server import NOTES_URI
from services.gateway.app import GatewayService
from shared.embedded import NatsServer, RedisServer
from tests.conftest import ADMIN_KEY, ALICE_KEY, make_config
from tests.e2e.test_gateway import mcp_client
from tests.helpers import InProcessMesh, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"gwsub{uuid.uuid4().hex[:8]}"
DENIED_URI = "demo://readme"  # listed, but Alice's role denies `demo__readme`
TEMPLATED_URI = "demo://echo/only-a-template"  # readable through the template, but not listed
WAIT_S = 10.0
QUIET_S = 0.5  # how long a session that should hear nothing is given after a witness heard the update


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(git_repo: Path, nats_server: NatsServer, redis_server: RedisServer,
                  ) -> AsyncIterator[GatewayService]:
    """Mesh and gateway (port 0) for the module."""
    roles = make_config(git_repo).model_dump(mode="json")["roles"]
    roles["analyst"]["deny"] = ["demo__crash", "demo__readme"]
    config = make_config(git_repo, prefix=PREFIX, roles=roles)
    async with InProcessMesh(nats_server.url, config, redis_server.url, gateway=True) as mesh:
        yield mesh.gateway


@pytest.fixture
def gateway_url(gateway: GatewayService) -> str:
    return gateway.url


class LegacySession:
    """A 2025-11-25 session (`ClientSession.initialize`) to the gateway and the updates it is told of."""

    def __init__(self, session: ClientSession, initialized: types.InitializeResult,
                 updates: asyncio.Queue[str]) -> None:
        self.session = session
        self.initialized = initialized
        self.updates = updates

    async def subscribe(self, uri: str) -> None:
        # A raw request: the SDK's `subscribe_resource` warns that the method is gone at 2026-07-28.
        await self.session.send_request(
            types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult)

    async def unsubscribe(self, uri: str) -> None:
        await self.session.send_request(
            types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri)), types.EmptyResult)

    async def next_update(self) -> str:
        async with asyncio.timeout(WAIT_S):
            return await self.updates.get()


@contextlib.asynccontextmanager
async def legacy_session(url: str, key: str) -> AsyncIterator[LegacySession]:
    """An initialized 2025-11-25 session with `key`, collecting the URIs of `notifications/resources/updated`."""
    updates: asyncio.Queue[str] = asyncio.Queue()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.put_nowait(message.params.uri)

    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, message_handler=on_message) as session,
    ):
        initialized = await session.initialize()
        yield LegacySession(session, initialized, updates)


async def leave_note(url: str, text: str) -> None:
    """Change `demo://notes` the way any client would: call `demo__note` through the gateway."""
    async with mcp_client(url, ADMIN_KEY) as client:
        result = await client.call_tool("demo__note", {"text": text})
    assert not result.is_error, result


async def test_the_gateway_advertises_resource_subscriptions(gateway_url: str) -> None:
    """On the 2025-11-25 handshake the gateway declares `resources.subscribe`, now that it serves it."""
    async with legacy_session(gateway_url, ALICE_KEY) as legacy:
        resources = legacy.initialized.capabilities.resources
    assert resources is not None and resources.subscribe is True


async def test_a_subscribed_2025_session_is_told_when_a_tool_changes_the_resource(gateway_url: str) -> None:
    """Alice subscribes to `demo://notes`; a `demo__note` call changes it, and she gets
    `notifications/resources/updated` for that URI, then reads the change."""
    async with legacy_session(gateway_url, ALICE_KEY) as legacy:
        await legacy.subscribe(NOTES_URI)
        await leave_note(gateway_url, "told over the 2025 wire")
        assert await legacy.next_update() == NOTES_URI
        notes = await legacy.session.read_resource(NOTES_URI)
    assert "told over the 2025 wire" in notes.contents[0].text  # type: ignore[union-attr]


async def test_after_unsubscribing_a_session_is_told_nothing(gateway_url: str) -> None:
    """A session that unsubscribed hears nothing of the next change, while a still-subscribed
    witness does (so the change really was announced)."""
    async with legacy_session(gateway_url, ALICE_KEY) as leaver, legacy_session(gateway_url, ADMIN_KEY) as witness:
        await leaver.subscribe(NOTES_URI)
        await witness.subscribe(NOTES_URI)
        await leave_note(gateway_url, "both subscribed")
        assert await leaver.next_update() == NOTES_URI  # the leaver did hear while subscribed
        assert await witness.next_update() == NOTES_URI
        await leaver.unsubscribe(NOTES_URI)
        await leave_note(gateway_url, "only the witness is subscribed")
        assert await witness.next_update() == NOTES_URI
        await asyncio.sleep(QUIET_S)  # absence can only be shown by waiting; the witness heard it already
    assert leaver.updates.empty(), "an unsubscribed session was told of an update"


async def test_watching_a_denied_resource_is_refused_as_reading_it_is(gateway_url: str) -> None:
    """Alice's role denies `demo__readme`: subscribing to its URI gets the read's refusal, -32003 forbidden."""
    async with legacy_session(gateway_url, ALICE_KEY) as legacy:
        with pytest.raises(MCPError) as refused:
            await legacy.subscribe(DENIED_URI)
        await legacy.subscribe(NOTES_URI)  # the session is still fine, and an allowed URI is taken
    assert refused.value.code == -32003
    assert refused.value.data["reason"] == "forbidden"


@pytest.mark.parametrize("uri", [TEMPLATED_URI, "nowhere://nothing"], ids=["template-only", "unknown"])
async def test_only_listed_resources_can_be_watched(gateway_url: str, uri: str) -> None:
    """A URI no server lists, even one a template reads, is refused with -32602 saying why."""
    async with legacy_session(gateway_url, ADMIN_KEY) as legacy:
        with pytest.raises(MCPError) as refused:
            await legacy.subscribe(uri)
    assert refused.value.code == -32602
    assert "only listed resources can be watched" in refused.value.message


async def test_a_2026_listen_stream_gets_resource_updated_for_what_the_caller_may_watch(gateway_url: str) -> None:
    """Alice listens for notes, the denied readme and a template-only URI: only notes is honoured,
    and a `demo__note` call reaches her stream as `ResourceUpdated(demo://notes)`."""
    wanted = [NOTES_URI, DENIED_URI, TEMPLATED_URI]
    async with mcp_client(gateway_url, ALICE_KEY) as client, client.listen(resource_subscriptions=wanted) as stream:
        await leave_note(gateway_url, "told over the 2026 wire")
        event = await asyncio.wait_for(anext(aiter(stream)), WAIT_S)
    assert stream.honored.resource_subscriptions == [NOTES_URI]
    assert event == ResourceUpdated(uri=NOTES_URI)


async def test_an_admin_listen_stream_is_honoured_in_full(gateway_url: str) -> None:
    """The narrowing is per caller: the admin may watch both listed resources, so both are honoured."""
    async with mcp_client(gateway_url, ADMIN_KEY) as client, \
            client.listen(resource_subscriptions=[NOTES_URI, DENIED_URI]) as stream:
        honored = stream.honored.resource_subscriptions
    assert sorted(honored or []) == sorted([NOTES_URI, DENIED_URI])


async def test_a_closed_session_is_forgotten(gateway: GatewayService) -> None:
    """The gateway holds a subscribed session only while its connection lives: closed, it is dropped."""
    await eventually(lambda: asyncio.sleep(0, gateway.watching_connections == 0 or None))  # earlier tests' gone
    async with legacy_session(gateway.url, ALICE_KEY) as legacy:
        await legacy.subscribe(NOTES_URI)
        await legacy.subscribe(NOTES_URI)  # the same connection: still one
        assert gateway.watching_connections == 1
    await eventually(lambda: asyncio.sleep(0, gateway.watching_connections == 0 or None))

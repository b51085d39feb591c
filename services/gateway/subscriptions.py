"""Resource subscriptions through the gateway: who watches which URI, and telling them it changed.

Executors watch the resources their backends list and publish each update on core-NATS
`toolbus.resource.updated` as `{"server", "uri"}` (`services/executor/watch.py`). The gateway
holds one subscription to that subject and tells

- every 2025-11-25 session that sent `resources/subscribe` for the URI, with
  `notifications/resources/updated` on the session's standalone stream, and
- every 2026-07-28 `subscriptions/listen` stream whose filter names the URI, by publishing
  `ResourceUpdated` on the gateway's subscription bus.

Only a **listed** resource can be watched: executors follow exactly the URIs their backends list,
so a URI only a template matches would be accepted and then never hear of a change. A caller may
watch a URI only if its roles allow the resource's public name, the rule a read is refused by.

Every worker of a pool has its own backend session and may report the same change, so the reports
of one URI are collapsed: the first starts a short window, and one notification goes out when it
ends. Delivering at the window's *end* loses no change: whatever was reported during the window
happened before the notification, so the client's read after it sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import structlog
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ListenHandler, ResourceUpdated, SubscriptionBus
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.gateway.auth import caller
from services.gateway.frontend import MeshView
from services.gateway.mapping import gateway_error
from shared.catalog import CatalogIndex
from shared.config import Principal, Role
from shared.contracts import CatalogEntry, CatalogKind
from shared.errors import CallRefused, InvalidArguments, ToolbusError
from shared.policy import authorize
from shared.service import BackgroundTasks
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

DEDUPE_WINDOW_S = 0.1  # reports of one URI this close together are one change (workers report at once)
STOP_TASKS_S = 2.0


def watchable_resource(catalog: CatalogIndex, principal: Principal, roles: dict[str, Role], uri: str,
                       ) -> CatalogEntry:
    """The listed resource at `uri` that `principal` may watch; refused as a read would be
    (`forbidden`), or with `invalid_arguments` when no server lists the URI itself."""
    entry = catalog.resource(uri)  # the entry a read of `uri` is routed by, so both agree
    if entry is None:
        raise InvalidArguments(f"no server lists a resource {uri[:200]!r}: only listed resources can be watched")
    authorize(principal, roles, entry.public_name)
    if entry.kind is not CatalogKind.RESOURCE:
        raise InvalidArguments(f"{uri[:200]!r} is not a listed resource (only template {entry.uri!r} matches it): "
                               "only listed resources can be watched")
    return entry


class CoalescedUpdates:
    """Reports of one URI within `window_s` of the first are delivered once, when the window ends."""

    def __init__(self, window_s: float, deliver: Callable[[str], None]) -> None:
        self._window_s = window_s
        self._deliver = deliver
        self._waiting: dict[str, asyncio.TimerHandle] = {}

    def report(self, uri: str) -> None:
        if uri not in self._waiting:
            self._waiting[uri] = asyncio.get_running_loop().call_later(self._window_s, self._flush, uri)

    def close(self) -> None:
        """Drop what is still waiting (the gateway is stopping: nobody is left to tell)."""
        for timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()

    def _flush(self, uri: str) -> None:
        del self._waiting[uri]
        self._deliver(uri)


@dataclass
class _Watcher:
    """One 2025-era client connection's subscriptions."""

    session: ServerSession  # a request's session; its standalone stream is the connection's
    uris: set[str] = field(default_factory=set)


class ResourceWatchers:
    """The gateway's `resources/subscribe`, `resources/unsubscribe` and `subscriptions/listen`
    handlers, and the fan-out of the mesh's resource updates to them."""

    def __init__(self, view: MeshView, changes: SubscriptionBus, listen: ListenHandler,
                 key: Callable[[], str]) -> None:
        self._view = view
        self._changes = changes  # 2026-07-28 listen streams take their events from this bus
        self._listen = listen
        self._key = key  # the caller's API key, as the frontend has it
        self._watchers: dict[Connection, _Watcher] = {}
        self._updates = CoalescedUpdates(DEDUPE_WINDOW_S, self._spawn_delivery)
        self._tasks = BackgroundTasks()
        self._subscription: Subscription | None = None

    @property
    def connections(self) -> int:
        """2025-era client connections holding subscriptions (each is forgotten when it closes)."""
        return len(self._watchers)

    async def open(self, nc: NatsClient, subjects: Subjects) -> None:
        """Follow the mesh's resource updates (every gateway replica hears all of them)."""
        self._subscription = await nc.subscribe(subjects.resource_updated, cb=self._on_update)

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):  # a closed connection has no subscription left to end
                await self._subscription.unsubscribe()
        self._updates.close()
        await self._tasks.stop(STOP_TASKS_S)

    # --- MCP handlers ----------------------------------------------------------------------------

    async def subscribe(self, ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams,
                        ) -> types.EmptyResult:
        """`resources/subscribe` (2025-11-25): remember the URI for this connection, if it may be watched."""
        self._refuse_unless_watchable(self._caller(), params.uri)
        connection = _connection_of(ctx)
        watcher = self._watchers.get(connection)
        if watcher is None:
            watcher = self._watchers[connection] = _Watcher(ctx.session)
            # the SDK unwinds a connection's exit stack when it closes: nothing outlives its client
            connection.exit_stack.callback(self._watchers.pop, connection, None)
        watcher.uris.add(params.uri)
        return types.EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams,
                          ) -> types.EmptyResult:
        """`resources/unsubscribe`: forget the URI for this connection (a URI never subscribed is no error)."""
        watcher = self._watchers.get(_connection_of(ctx))
        if watcher is not None:
            watcher.uris.discard(params.uri)
        return types.EmptyResult()

    async def listen(self, ctx: ServerRequestContext[Any], params: types.SubscriptionsListenRequestParams,
                     ) -> types.SubscriptionsListenResult:
        """`subscriptions/listen` (2026-07-28) with its resource URIs narrowed to those the caller may
        watch: the acknowledgement's honoured subset shows the client which ones were dropped."""
        wanted = params.notifications.resource_subscriptions
        if wanted:
            principal = self._caller()
            kept = [uri for uri in wanted if self._may_watch(principal, uri)]
            narrowed = params.notifications.model_copy(update={"resource_subscriptions": kept or None})
            params = params.model_copy(update={"notifications": narrowed})
        return await self._listen(ctx, params)

    def _refuse_unless_watchable(self, principal: Principal, uri: str) -> None:
        try:
            watchable_resource(self._view.catalog, principal, self._view.roles, uri)
        except ToolbusError as refused:
            raise gateway_error(refused) from None

    def _may_watch(self, principal: Principal, uri: str) -> bool:
        try:
            watchable_resource(self._view.catalog, principal, self._view.roles, uri)
        except CallRefused:
            return False
        return True

    def _caller(self) -> Principal:
        try:
            return caller(self._key(), self._view.principals)
        except ToolbusError as refused:
            raise gateway_error(refused) from None

    # --- updates from the mesh -------------------------------------------------------------------

    async def _on_update(self, msg: Msg) -> None:
        """One backend's report that a resource changed; reports of the URI close together are one."""
        try:
            update = json.loads(msg.data)
            server, uri = update["server"], update["uri"]
        except (ValueError, KeyError, TypeError):
            log.warning("gateway.bad_resource_update", size=len(msg.data))
            return
        entry = self._view.catalog.resource(uri) if isinstance(uri, str) else None
        if entry is None or entry.kind is not CatalogKind.RESOURCE or entry.server != server:
            # not what a read of the URI is routed to (two servers list it, or it is no longer listed)
            log.debug("gateway.resource_update_ignored", server=server, uri=str(uri)[:200])
            return
        self._updates.report(uri)

    def _spawn_delivery(self, uri: str) -> None:
        self._tasks.spawn(self._deliver(uri))

    async def _deliver(self, uri: str) -> None:
        """Tell every listen stream (through the bus, which filters by URI) and every subscribed session."""
        await self._changes.publish(ResourceUpdated(uri=uri))
        for connection, watcher in list(self._watchers.items()):
            if uri not in watcher.uris:
                continue
            try:
                await watcher.session.send_resource_updated(uri)
            except Exception as error:  # noqa: BLE001  # a session that cannot be told is forgotten
                log.info("gateway.watcher_dropped", uri=uri, error=repr(error))
                self._watchers.pop(connection, None)


def _connection_of(ctx: ServerRequestContext[Any]) -> Connection:
    """The client connection a request came on. The SDK builds a `ServerSession` per request, so
    the connection behind it is what identifies one client across its requests (and its exit stack
    is where cleanup goes); `ServerSession` keeps it private, there is no public accessor."""
    connection: Connection = ctx.session._connection
    return connection

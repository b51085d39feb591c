"""Updates of the resources a backend lists, published on the bus for the gateway's subscribers.

A backend tells its client that a resource changed in one of two ways, by protocol era:

- **2026-07-28**: the client opens a `subscriptions/listen` stream naming the URIs, the server
  acknowledges the subset it honours and sends `notifications/resources/updated` on that stream.
  A stream lost while the session lives is opened again, with backoff. There is no replay: an
  update during the gap is missed, as it would be for any MCP client.
- **2025 handshake**: if the server declares `resources.subscribe`, the client sends
  `resources/subscribe` per URI and the updates arrive as session notifications, through the
  SDK client's `message_handler`.

Only resources the backend *lists* are watched: a template stands for endlessly many URIs, and
nothing tells the executor which of them anyone cares about. Each update is published as
core-NATS JSON `{"server", "uri"}` on `toolbus.resource.updated` (nobody waiting means nobody
subscribed, so nothing is lost). Every worker of a pool has its own backend session, so one
change can be published once per worker; the gateway collapses them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import mcp_types as types
import structlog
from mcp import Client
from mcp.client import IncomingMessage
from mcp.shared.subscriptions import ResourceUpdated
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from nats.aio.client import Client as NatsClient

from shared.codec import dump_json
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

UpdateSink = Callable[[str, str], Awaitable[None]]
"""Where an update goes: `(server name, resource URI)`."""

RELISTEN_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class UpdatePublisher:
    """The `UpdateSink` of an executor: `{"server", "uri"}` on core-NATS `toolbus.resource.updated`."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self._nc = nc
        self._subject = subjects.resource_updated

    async def __call__(self, server: str, uri: str) -> None:
        await self._nc.publish(self._subject, dump_json({"server": server, "uri": uri}))


def tells_of_updates(client: Client) -> bool:
    """Whether the backend can tell of resource updates on this session (`resources.subscribe`;
    at 2026-07-28 the SDK derives it from whether `subscriptions/listen` is served)."""
    resources = client.server_capabilities.resources
    return resources is not None and bool(resources.subscribe)


class ResourceWatch:
    """Follows one backend's listed resources for updates, on whichever session is live.

    `start` runs the watch for a session once it is connected, `stop` ends it with the session;
    `on_message` is that session's `message_handler` (2025-era updates arrive through it).
    """

    def __init__(self, server: str, publish: UpdateSink) -> None:
        self._server = server
        self._publish = publish
        self._task: asyncio.Task[None] | None = None
        # URIs a 2025-era session subscribed to. Empty on 2026-07-28, where the same notifications
        # also reach the message handler (the SDK tees them) but the listen stream delivers them.
        self._notified: set[str] = set()

    def start(self, client: Client, listed: Callable[[], Awaitable[list[str]]]) -> asyncio.Task[None]:
        """Watch what `listed` names, for as long as `client`'s session lives (until `stop`).

        The task it returns ends by itself when there is nothing to listen to: nothing listed, no
        update support, or a 2025-era session once its subscriptions are made (updates then come
        through `on_message`).
        """
        self._task = asyncio.create_task(self._watch(client, listed), name=f"watch:{self._server}")
        return self._task

    async def stop(self) -> None:
        """End the watch, before its session closes (a listen stream must not outlive it)."""
        task, self._task = self._task, None
        self._notified = set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def on_message(self, message: IncomingMessage) -> None:
        """The session's message handler: a subscribed resource's update on a 2025-era session."""
        if isinstance(message, types.ResourceUpdatedNotification) and message.params.uri in self._notified:
            await self._send(message.params.uri)

    async def _watch(self, client: Client, listed: Callable[[], Awaitable[list[str]]]) -> None:
        if not tells_of_updates(client):
            return
        try:
            uris = await listed()
        except Exception as error:  # noqa: BLE001  # the session's own requests report a broken session
            log.warning("backend.resources_not_listed", backend=self._server, error=repr(error))
            return
        if not uris:
            return
        if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
            await self._listen(client, uris)
        else:
            await self._subscribe(client, uris)

    async def _subscribe(self, client: Client, uris: Sequence[str]) -> None:
        """`resources/subscribe` per URI; from then on updates arrive through `on_message`.

        A raw request rather than `Client.subscribe_resource`, which the SDK marks deprecated (the
        method is gone at 2026-07-28) and so warns on each use, although it is right for this era.
        """
        for uri in uris:
            self._notified.add(uri)  # before the request: an update may follow its answer at once
            try:
                await client.session.send_request(
                    types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)), types.EmptyResult)
            except Exception as error:  # noqa: BLE001  # one refused URI leaves the others watched
                self._notified.discard(uri)
                log.warning("backend.subscribe_refused", backend=self._server, uri=uri, error=repr(error))
        log.info("backend.resources_watched", backend=self._server, uris=len(self._notified), era="subscribe")

    async def _listen(self, client: Client, uris: Sequence[str]) -> None:
        """One `subscriptions/listen` stream for every URI, opened again (with backoff) if it ends.

        The backoff resets once a stream has delivered an update: a server that acknowledges and
        drops at once is not hammered, and a long-lived stream's loss is followed up quickly.
        """
        failures = 0
        while True:
            try:
                async with client.listen(resource_subscriptions=uris) as subscription:
                    honored = subscription.honored.resource_subscriptions or []
                    log.info("backend.resources_watched", backend=self._server, uris=len(honored), era="listen",
                             declined=sorted(set(uris) - set(honored)))
                    if not honored:
                        return
                    async for event in subscription:
                        if isinstance(event, ResourceUpdated):
                            failures = 0
                            await self._send(event.uri)
                log.info("backend.listen_closed", backend=self._server)  # the server ended it deliberately
            except Exception as error:  # noqa: BLE001  # a lost stream is opened again while the session lives
                log.info("backend.listen_lost", backend=self._server, error=repr(error))
            await asyncio.sleep(RELISTEN_BACKOFF_S[min(failures, len(RELISTEN_BACKOFF_S) - 1)])
            failures += 1

    async def _send(self, uri: str) -> None:
        try:
            await self._publish(self._server, uri)
        except Exception as error:  # noqa: BLE001  # best effort, like progress: a lost update fails nothing
            log.warning("backend.update_not_published", backend=self._server, uri=uri, error=repr(error))

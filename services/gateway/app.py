"""Gateway service: the whole mesh as one MCP server, over streamable HTTP at `/mcp` or stdio.

Wiring only: a NATS connection for the registry (config, tools, prompts, resources, kept
current with a KV watch), a `ToolbusClient` for bus requests, the MCP SDK's low-level `Server`
with the handlers of `frontend.py`, and uvicorn serving the SDK's streamable HTTP app (or the
SDK's stdio loop). The mapping between bus and MCP shapes is `mapping.py`; who the caller is,
`auth.py`. A registry change is announced to listening clients as `notifications/*/list_changed`;
a backend's resource update, to the clients watching it (`subscriptions.py`).

The SDK does the HTTP side: bearer auth (401 with `WWW-Authenticate` before any MCP work),
Host/Origin checks against DNS rebinding (on for loopback binds), the request size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import mcp_types as types
import structlog
import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from nats.aio.client import Client as NatsClient
from starlette.applications import Starlette

from services.gateway.auth import ApiKeyVerifier, bearer_key, caller
from services.gateway.frontend import McpFrontend, MeshView
from services.gateway.subscriptions import ResourceWatchers
from shared.bus import connect
from shared.catalog import CatalogIndex
from shared.client import ToolbusClient
from shared.config import Config, GatewayConfig
from shared.contracts import CatalogEntry, CatalogKind, ToolSpec
from shared.policy import index_principals
from shared.registry import Registry, RegistryWatch, tool_named_by
from shared.service import BackgroundTasks
from shared.subjects import DEFAULT_PREFIX, Subjects

log = structlog.get_logger(__name__)

MCP_PATH = "/mcp"
STARTUP_TIMEOUT_S = 10.0
STOP_TASKS_S = 5.0
_DEFAULTS = GatewayConfig()  # the `gateway:` section's defaults are the service's too


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway connects and listens (port 0: the OS picks; read `GatewayService.url`)."""

    nats_url: str
    prefix: str = DEFAULT_PREFIX
    instance: str = "gateway"
    host: str = _DEFAULTS.host
    port: int = _DEFAULTS.port
    call_timeout_s: float = _DEFAULTS.call_timeout_s  # the deadline of a call whose client sets none
    max_request_body_bytes: int = _DEFAULTS.max_request_body_bytes


class _ServerWithoutSignals(uvicorn.Server):
    """uvicorn that leaves SIGTERM/SIGINT to `run_service`, which drains the whole service."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService:
    """An MCP server whose tools, prompts and resources are the mesh's, used with the caller's key."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._nc: NatsClient | None = None
        self._client: ToolbusClient | None = None
        self._view = MeshView()
        self._frontend = McpFrontend(self._view, self._bus_client, settings.call_timeout_s, key=bearer_key)
        self._changes = InMemorySubscriptionBus()  # list_changed and resource updates for `subscriptions/listen`
        self._listen = ListenHandler(self._changes)
        self._key: Callable[[], str] = bearer_key  # the caller's API key: the HTTP request's, or stdio's one key
        self._watchers = ResourceWatchers(self._view, self._changes, self._listen, key=self._caller_key)
        self._http: _ServerWithoutSignals | None = None
        self._serving: asyncio.Task[None] | None = None
        self._tasks = BackgroundTasks()

    @property
    def ready(self) -> bool:
        return self._http is not None and self._http.started

    @property
    def url(self) -> str:
        """The MCP endpoint, e.g. `http://127.0.0.1:8765/mcp` (the bound port when 0 was asked)."""
        assert self._http is not None and self._http.started, "not started"
        host, port = self._http.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}{MCP_PATH}"

    @property
    def watching_connections(self) -> int:
        """Client connections with resource subscriptions (2025-11-25 `resources/subscribe`)."""
        return self._watchers.connections

    async def start(self) -> None:
        """Connect to the mesh, then listen for MCP clients over HTTP."""
        await self.connect()
        await self._serve_http(self.asgi_app())
        log.info("gateway.listening", url=self.url)

    async def serve_stdio(self, api_key: str) -> None:
        """Serve one MCP client over stdin/stdout (a client that launched this process) until it
        closes stdin, every request made with `api_key` (an unknown key is refused at once)."""
        await self.connect()
        caller(api_key, self._view.principals)  # raises Unauthenticated before the client waits on us
        self._key = lambda: api_key
        self._frontend = McpFrontend(self._view, self._bus_client, self._settings.call_timeout_s, key=lambda: api_key)
        server = self.mcp_server()
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    async def connect(self) -> None:
        """Load config, tools and catalog and follow their changes; open the bus client."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        registry = await Registry.open(self._nc.jetstream(), create=True)
        self._on_config(await registry.get_config())
        self._view.tools.update(await registry.tools())
        self._view.catalog = CatalogIndex.of(await registry.catalog())
        self._tasks.spawn(registry.watch(RegistryWatch(
            self._on_config, self._on_tool, on_entry=self._on_entry, on_removed=self._on_removed)))
        await self._watchers.open(self._nc, Subjects(self._settings.prefix))
        # The gateway has no key of its own: every call carries its caller's key (`api_key=`).
        self._client = ToolbusClient(self._settings.nats_url, "", prefix=self._settings.prefix,
                                     timeout_s=self._settings.call_timeout_s, name=f"{self._settings.instance}-calls")
        await self._client.connect()

    async def stop(self) -> None:
        """Stop taking HTTP requests (those in flight finish, bounded), then disconnect."""
        self._listen.close()
        if self._http is not None and self._serving is not None:
            self._http.should_exit = True
            await asyncio.wait({self._serving}, timeout=2 * STOP_TASKS_S)  # uvicorn's graceful shutdown is bounded
        await self._tasks.stop(STOP_TASKS_S)
        await self._watchers.close()
        if self._client is not None:
            await self._client.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    # --- MCP -----------------------------------------------------------------------------------

    def mcp_server(self) -> Server[Any]:
        """The SDK's low-level server with the gateway's handlers."""
        frontend = self._frontend
        server: Server[Any] = Server(
            self.name, version=_version(),
            instructions="Every tool, prompt and resource of a toolbus mesh, used with your own API key.",
            on_list_tools=frontend.list_tools, on_call_tool=frontend.call_tool,
            on_list_prompts=frontend.list_prompts, on_get_prompt=frontend.get_prompt,
            on_list_resources=frontend.list_resources, on_read_resource=frontend.read_resource,
            on_list_resource_templates=frontend.list_resource_templates,
            on_subscribe_resource=self._watchers.subscribe, on_unsubscribe_resource=self._watchers.unsubscribe,
            on_subscriptions_listen=self._watchers.listen,  # the ListenHandler, resource URIs narrowed per caller
        )
        # logging/setLevel (2025-11-25 only) is registered directly: the constructor's
        # `on_set_logging_level` warns that the capability is deprecated at 2026-07-28.
        server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, frontend.set_logging_level)
        return server

    def asgi_app(self) -> Starlette:
        """The SDK's streamable HTTP app at `/mcp`, bearer keys checked by `ApiKeyVerifier`.

        `issuer_url` is required by `AuthSettings` but unused: toolbus keys are not OAuth
        tokens, so no authorization server or resource metadata is advertised.
        """
        base = f"http://{self._settings.host}:{self._settings.port}"
        return self.mcp_server().streamable_http_app(
            streamable_http_path=MCP_PATH,
            host=self._settings.host,  # a loopback host turns on the SDK's Host/Origin checks
            token_verifier=ApiKeyVerifier(lambda: self._view.principals),
            auth=AuthSettings(issuer_url=base, resource_server_url=None),
            max_request_body_size=self._settings.max_request_body_bytes,
        )

    def _caller_key(self) -> str:
        return self._key()  # late: `serve_stdio` replaces the key source after construction

    def _bus_client(self) -> ToolbusClient:
        assert self._client is not None, "not connected"
        return self._client

    # --- registry ------------------------------------------------------------------------------

    def _on_tool(self, spec: ToolSpec) -> None:
        known = self._view.tools.get(spec.public_name)
        self._view.tools[spec.public_name] = spec
        # every worker re-registers its backend's tools when it (re)connects: only a real change is news
        if known is None or known.model_dump(exclude={"registered_at_ms"}) != spec.model_dump(
                exclude={"registered_at_ms"}):
            self._announce(ToolsListChanged())

    def _on_entry(self, key: str, entry: CatalogEntry) -> None:
        known = self._view.catalog.entries.get(key)
        self._view.catalog.put(key, entry)
        if known is None or known.definition != entry.definition:
            self._announce(_LIST_CHANGED[entry.kind])

    def _on_removed(self, key: str) -> None:
        if (tool := tool_named_by(key)) is not None:
            if self._view.tools.pop(tool, None) is not None:
                self._announce(ToolsListChanged())
        elif (entry := self._view.catalog.entries.get(key)) is not None:
            self._view.catalog.remove(key)
            self._announce(_LIST_CHANGED[entry.kind])

    def _on_config(self, config: Config) -> None:
        self._view.principals = index_principals(config.principals)
        self._view.roles = config.roles

    def _announce(self, event: ServerEvent) -> None:
        """Tell listening clients a list changed (roles filter what they see when they re-list)."""
        self._tasks.spawn(self._changes.publish(event))

    # --- HTTP ----------------------------------------------------------------------------------

    async def _serve_http(self, app: Starlette) -> None:
        """Run uvicorn as a background task and wait (bounded) until it listens."""
        config = uvicorn.Config(app, host=self._settings.host, port=self._settings.port, log_config=None,
                                access_log=False, lifespan="on", timeout_graceful_shutdown=int(STOP_TASKS_S))
        self._http = http = _ServerWithoutSignals(config)
        self._serving = serving = asyncio.create_task(http.serve())
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not http.started:
                if serving.done():
                    serving.result()  # raises what stopped it (e.g. the port is taken)
                    raise RuntimeError("the gateway's HTTP server stopped while starting")
                await asyncio.sleep(0.01)


def _version() -> str:
    """toolbus's installed version, shown to clients as the server's."""
    try:
        return version("toolbus")
    except PackageNotFoundError:  # run from a source tree without installing
        return "0.0.0"


_LIST_CHANGED: dict[CatalogKind, ServerEvent] = {
    CatalogKind.PROMPT: PromptsListChanged(), CatalogKind.RESOURCE: ResourcesListChanged(),
    CatalogKind.TEMPLATE: ResourcesListChanged(),
}

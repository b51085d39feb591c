"""Gateway service: the whole mesh as one MCP server over streamable HTTP at `/mcp`.

Wiring only: a NATS connection for the registry (config and tools, kept current with a KV
watch), a `ToolbusClient` for bus calls, the MCP SDK's low-level `Server` with `tools/list`
and `tools/call` handlers, and uvicorn serving the SDK's streamable HTTP app. The mapping
between bus and MCP shapes is `mapping.py`; who the caller is, `auth.py`.

The SDK does the HTTP side: bearer auth (401 with `WWW-Authenticate` before any MCP work),
Host/Origin checks against DNS rebinding (on for loopback binds), the request size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mcp_types as types
import structlog
import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.exceptions import MCPError
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError
from starlette.applications import Starlette

from services.gateway.auth import ApiKeyVerifier, caller, caller_key
from services.gateway.mapping import call_tool_result, gateway_error, visible_tools
from services.router.policy import index_principals
from shared.bus import connect
from shared.client import ToolbusClient
from shared.config import Config, Principal, Role
from shared.contracts import ToolSpec
from shared.errors import DeadlineExceeded, InternalError, InvalidRequest, ToolbusError
from shared.registry import Registry
from shared.service import BackgroundTasks
from shared.subjects import DEFAULT_PREFIX, Header

log = structlog.get_logger(__name__)

MCP_PATH = "/mcp"
STARTUP_TIMEOUT_S = 10.0
STOP_TASKS_S = 5.0


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway connects and listens (port 0: the OS picks; read `GatewayService.url`)."""

    nats_url: str
    prefix: str = DEFAULT_PREFIX
    instance: str = "gateway"
    host: str = "127.0.0.1"
    port: int = 8765
    call_timeout_s: float = 60.0  # until the client's own timeout becomes the call's deadline
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_SIZE


class _ServerWithoutSignals(uvicorn.Server):
    """uvicorn that leaves SIGTERM/SIGINT to `run_service`, which drains the whole service."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService:
    """An MCP server whose tools are the registry's tools, called over the bus with the caller's key."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._nc: NatsClient | None = None
        self._client: ToolbusClient | None = None
        self._config: Config | None = None
        self._principals: dict[str, Principal] = {}
        self._tools: dict[str, ToolSpec] = {}
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

    async def start(self) -> None:
        """Connect, load config and tools and follow their changes, then listen for MCP clients."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        registry = await Registry.open(self._nc.jetstream(), create=True)
        self._on_config(await registry.get_config())
        self._tools = dict(await registry.tools())
        self._tasks.spawn(registry.watch(self._on_tool, self._on_config))
        # The gateway has no key of its own: every call carries its caller's key (`api_key=`).
        self._client = ToolbusClient(self._settings.nats_url, "", prefix=self._settings.prefix,
                                     timeout_s=self._settings.call_timeout_s, name=f"{self._settings.instance}-calls")
        await self._client.connect()
        await self._serve_http(self.asgi_app())
        log.info("gateway.listening", url=self.url)

    async def stop(self) -> None:
        """Stop taking HTTP requests (those in flight finish, bounded), then disconnect."""
        if self._http is not None and self._serving is not None:
            self._http.should_exit = True
            await asyncio.wait({self._serving}, timeout=2 * STOP_TASKS_S)  # uvicorn's graceful shutdown is bounded
        await self._tasks.stop(STOP_TASKS_S)
        if self._client is not None:
            await self._client.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    # --- MCP -----------------------------------------------------------------------------------

    def mcp_server(self) -> Server[Any]:
        """The SDK's low-level server with the gateway's handlers."""
        return Server(self.name, version="0.1.0", on_list_tools=self._list_tools, on_call_tool=self._call_tool)

    def asgi_app(self) -> Starlette:
        """The SDK's streamable HTTP app at `/mcp`, bearer keys checked by `ApiKeyVerifier`.

        `issuer_url` is required by `AuthSettings` but unused: toolbus keys are not OAuth
        tokens, so no authorization server or resource metadata is advertised.
        """
        base = f"http://{self._settings.host}:{self._settings.port}"
        return self.mcp_server().streamable_http_app(
            streamable_http_path=MCP_PATH,
            host=self._settings.host,  # a loopback host turns on the SDK's Host/Origin checks
            token_verifier=ApiKeyVerifier(lambda: self._principals),
            auth=AuthSettings(issuer_url=base, resource_server_url=None),
            max_request_body_size=self._settings.max_request_body_bytes,
        )

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """Every registered tool the caller's roles allow (one page: the registry is small)."""
        try:
            principal = caller(self._principals)
        except ToolbusError as refused:
            raise gateway_error(refused) from None
        return types.ListToolsResult(tools=visible_tools(self._tools.values(), principal, self._roles))

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """One bus call with the caller's key; the router decides whether it may run."""
        assert self._client is not None
        try:
            result = await self._client.call(
                params.name, params.arguments or {}, raise_on_error=False, api_key=caller_key(),
                priority=_priority(ctx), session=_header(ctx, Header.SESSION),
            )
        except ToolbusError as refused:
            raise gateway_error(refused) from None
        except TimeoutError:
            timeout = self._settings.call_timeout_s
            raise gateway_error(DeadlineExceeded(f"no result within {timeout:g} s")) from None
        except Exception:  # noqa: BLE001  # logged with its traceback by _internal_error
            raise _internal_error("gateway.call_failed", params.name) from None
        try:
            return call_tool_result(result)
        except ValidationError:  # a result that is no CallToolResult: the caller must not see pydantic's text
            raise _internal_error("gateway.bad_result", params.name) from None

    @property
    def _roles(self) -> dict[str, Role]:
        return self._config.roles if self._config is not None else {}

    # --- registry ------------------------------------------------------------------------------

    def _on_tool(self, spec: ToolSpec) -> None:
        self._tools[spec.public_name] = spec

    def _on_config(self, config: Config) -> None:
        self._config = config
        self._principals = index_principals(config.principals)

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


def _internal_error(event: str, tool: str) -> MCPError:
    """An unexpected failure, logged with its traceback; the client gets only the correlation id."""
    correlation_id = uuid.uuid4().hex
    log.exception(event, tool=tool, correlation_id=correlation_id)
    return gateway_error(InternalError(correlation_id))


def _header(ctx: ServerRequestContext[Any], name: str) -> str | None:
    """A header of the HTTP request that carried this MCP request (None over other transports)."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get(name) if headers is not None else None
    return str(value) if value else None


def _priority(ctx: ServerRequestContext[Any]) -> int | None:
    """`Toolbus-Priority` as a number; its range (0…3) is the router's to judge, as for any producer."""
    raw = _header(ctx, Header.PRIORITY)
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidRequest(f"{Header.PRIORITY} must be 0, 1, 2 or 3, not {raw[:20]!r}")
    return int(raw)

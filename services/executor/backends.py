"""Warm MCP client sessions to backend servers, restarted when they die.

One `Backend` per configured server. A supervisor task owns the SDK `Client` (its context
must be entered and left in one task); calls from any task share that session, which
multiplexes concurrent JSON-RPC requests. When the transport breaks (a stdio server crashed,
an HTTP server went away) the call fails as `BackendUnavailable`, a transient failure the
executor retries, and the supervisor starts a fresh session with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import structlog
from mcp import Client
from mcp.client import Transport
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CONNECTION_CLOSED,
    CallToolResult,
    GetPromptResult,
    LoggingMessageNotificationParams,
    Prompt,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    Tool,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from services.executor.relay import CallerRelay
from services.executor.watch import ResourceWatch, UpdateSink
from shared.config import ServerConfig

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
CONNECT_TIMEOUT_S = 30.0


_Result = TypeVar("_Result")
BackendResult = CallToolResult | ReadResourceResult | GetPromptResult


@dataclass
class Catalog:
    """What a backend offers besides tools."""

    prompts: list[Prompt] = field(default_factory=list)
    resources: list[Resource] = field(default_factory=list)
    templates: list[ResourceTemplate] = field(default_factory=list)


class BackendUnavailable(Exception):
    """The backend could not be reached or its session broke: retry later."""


class Backend:
    """A supervised, warm MCP session to one backend server."""

    def __init__(
        self, name: str, config: ServerConfig, on_connected: Callable[[Backend], Awaitable[None]] | None = None,
        relay: CallerRelay | None = None, resource_updates: UpdateSink | None = None,
    ) -> None:
        self.name = name
        self._config = config
        self._on_connected = on_connected
        self._relay = relay  # log lines, sampling and elicitation to the caller; None: the backend sees no client
        # each live session's listed resources are watched, their updates go to `resource_updates`
        self._watch = ResourceWatch(name, resource_updates) if resource_updates is not None else None
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self.registered = asyncio.Event()  # set once on_connected has run for the current session
        self._broken = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0  # sessions restarted since start (for status and tests)
        self._streak = 0  # restarts since the last successful call: sets the backoff

    async def start(self) -> None:
        """Start the session in the background; `wait_connected` tells when it is usable."""
        self._supervisor = asyncio.create_task(self._supervise(), name=f"backend:{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._broken.set()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    async def wait_connected(self, timeout: float) -> Client:
        """The live client, waiting up to `timeout` for a (re)start."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise BackendUnavailable(f"backend {self.name!r} is not connected") from None
        assert self._client is not None
        return self._client

    async def list_tools(self) -> list[Tool]:
        """Every tool the backend offers (following pagination)."""
        client = await self.wait_connected(CONNECT_TIMEOUT_S)
        return await _all_pages(lambda cursor: client.list_tools(cursor=cursor), "tools")

    async def catalog(self) -> Catalog:
        """The prompts, resources and resource templates the backend offers (none without the capability)."""
        client = await self.wait_connected(CONNECT_TIMEOUT_S)
        capabilities = client.server_capabilities
        catalog = Catalog()
        if capabilities.prompts is not None:
            catalog.prompts = await _all_pages(lambda cursor: client.list_prompts(cursor=cursor), "prompts")
        if capabilities.resources is not None:
            catalog.resources = await _all_pages(lambda cursor: client.list_resources(cursor=cursor), "resources")
            catalog.templates = await _all_pages(
                lambda cursor: client.list_resource_templates(cursor=cursor), "resource_templates")
        return catalog

    async def call_tool(
        self, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None, progress: ProgressFnT | None = None
    ) -> CallToolResult:
        """Run one tool call; a broken session raises `BackendUnavailable` and triggers a restart.

        With `progress`, the SDK sends a progress token and hands each of the tool's progress
        notifications to it (a tool reports progress only when asked to with a token).
        """
        return await self._request(lambda client: client.call_tool(
            tool, arguments, progress_callback=progress, meta=meta  # type: ignore[arg-type]
        ))

    async def read_resource(self, uri: str, meta: dict[str, Any] | None) -> ReadResourceResult:
        return await self._request(lambda client: client.read_resource(uri, meta=meta))  # type: ignore[arg-type]

    async def get_prompt(self, name: str, arguments: dict[str, str], meta: dict[str, Any] | None) -> GetPromptResult:
        return await self._request(lambda client: client.get_prompt(name, arguments, meta=meta))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def serving(self, call_id: str, meta: Mapping[str, Any] | None) -> Iterator[None]:
        """Around one request for a bus call: what the backend sends the caller meanwhile is that call's."""
        with self._relay.serving(call_id, meta) if self._relay is not None else contextlib.nullcontext():
            yield

    async def _request(self, send: Callable[[Client], Awaitable[_Result]]) -> _Result:
        """One request on the warm session; a broken session raises `BackendUnavailable` and restarts."""
        client = await self.wait_connected(CONNECT_TIMEOUT_S)
        try:
            result = await send(client)
        except MCPError as error:
            if error.code == CONNECTION_CLOSED:
                self._mark_broken(client)
                raise BackendUnavailable(f"backend {self.name!r} connection closed") from error
            raise
        except (OSError, httpx2.TransportError) as error:
            self._mark_broken(client)
            raise BackendUnavailable(f"backend {self.name!r} transport error: {error}") from error
        self._streak = 0
        return result

    def _mark_broken(self, client: Client) -> None:
        if client is self._client:
            self._connected.clear()
            self._broken.set()

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await self._run_session()
            except Exception as error:  # noqa: BLE001  # any failure of a session means: restart it
                log.warning("backend.session_failed", backend=self.name, error=repr(error))
            if self._stopping:
                return
            delay = RESTART_BACKOFF_S[min(self._streak, len(RESTART_BACKOFF_S) - 1)]
            self.restarts += 1
            self._streak += 1
            log.info("backend.restarting", backend=self.name, restarts=self.restarts, delay_s=delay)
            await asyncio.sleep(delay)

    async def _run_session(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(Client(await self._target(stack), cache=None, **self._peer()))
            self._client = client
            self._broken.clear()
            self._connected.set()
            log.info("backend.connected", backend=self.name, protocol=client.protocol_version)
            if self._on_connected is not None:
                await self._on_connected(self)
            self.registered.set()
            if self._watch is not None:
                self._watch.start(client, self._listed_uris)
            try:
                await self._broken.wait()
            finally:
                if self._watch is not None:
                    await self._watch.stop()
                self.registered.clear()
                self._connected.clear()
                self._client = None

    async def _listed_uris(self) -> list[str]:
        """The resources to watch: one listing of resources only (`catalog()` would also list prompts and templates)."""
        client = await self.wait_connected(CONNECT_TIMEOUT_S)
        resources = await _all_pages(lambda cursor: client.list_resources(cursor=cursor), "resources")
        return [str(resource.uri) for resource in resources]

    def _peer(self) -> dict[str, Any]:
        """The client callbacks that relay what the backend sends a caller (with them, the session
        declares the sampling and elicitation capabilities, so tools that need them can run), and
        the message handler a 2025-era session's resource updates arrive through."""
        watch: dict[str, Any] = {"message_handler": self._watch.on_message} if self._watch is not None else {}
        relay = self._relay
        if relay is None:
            return watch

        async def forward_log(params: LoggingMessageNotificationParams) -> None:
            client = self._client
            await relay.log(params, request_scoped=client is not None
                            and client.protocol_version in MODERN_PROTOCOL_VERSIONS)

        return {**watch, "sampling_callback": relay.sampling, "elicitation_callback": relay.elicitation,
                "logging_callback": forward_log}

    async def _target(self, stack: contextlib.AsyncExitStack) -> StdioServerParameters | Transport | MCPServer:
        """What the SDK client connects to: a subprocess, an HTTP endpoint with our headers, or an app."""
        config = self._config
        if config.app is not None:
            return load_app(config.app)
        if config.command is not None:
            return StdioServerParameters(
                command=resolve_command(config.command), args=config.args, env=config.env or None, cwd=config.cwd
            )
        assert config.url is not None
        timeout = httpx2.Timeout(30.0, read=300.0)
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=config.headers, timeout=timeout))
        return streamable_http_client(config.url, http_client=http)


def resolve_command(command: str) -> str:
    """The program a server's `command` names, preferring the environment toolbus runs in.

    `python` means this interpreter, and a bare name installed beside it (`mcp-server-git` in
    the venv's bin/) wins over PATH: `make up` runs `.venv/bin/toolbus` without activating the
    venv, and the system's python or PATH would start servers without their packages.
    """
    if os.sep in command:
        return command
    if command in ("python", "python3", Path(sys.executable).name):
        return sys.executable
    beside = Path(sys.executable).parent / command
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else command


def load_app(import_path: str) -> MCPServer:
    """The MCPServer at `module:attribute`, served in-process (no subprocess, no pipes).

    In-process suits trusted, well-behaved servers such as the demo tools: a tool that exits
    the process (demo `crash`) takes the executor down with it.
    """
    module_name, _, attribute = import_path.partition(":")
    app = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(app, MCPServer):
        raise TypeError(f"{import_path} is a {type(app).__name__}, not an MCPServer")
    return app


async def _all_pages(fetch: Callable[[str | None], Awaitable[Any]], field_name: str) -> list[Any]:
    """Every item of a paginated MCP list (`tools`, `prompts`, …), following `next_cursor`."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        items.extend(getattr(page, field_name))
        cursor = page.next_cursor
        if not cursor:
            return items

"""The gateway's MCP handlers: what an MCP client sees of the mesh.

Listing (`tools/list`, `prompts/list`, `resources/list`, `resources/templates/list`) answers
from the registry, filtered by the caller's roles with the router's own rule; everything else
(`tools/call`, `prompts/get`, `resources/read`) is one bus request made with the caller's own
key, so the router authenticates, authorizes, budgets and audits it like any producer's call.

While a tool runs, its progress notifications arrive on `toolbus.progress.<call_id>` and are
reported to the client against the client's own progress token; its log lines and its questions
to the caller (sampling, elicitation) are passed on by `client_relay.py`; if the client cancels
(`notifications/cancelled`, or its transport goes away), the SDK cancels the handler and the
gateway publishes `toolbus.cancel.<call_id>`, so the executor stops the tool.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from services.gateway.auth import caller
from services.gateway.client_relay import ClientRelay, SessionLogLevels, with_log_level
from services.gateway.mapping import (
    bus_result,
    gateway_error,
    visible_entries,
    visible_tools,
)
from shared.catalog import CatalogIndex
from shared.client import CallResult, ToolbusClient
from shared.config import Principal, Role
from shared.contracts import CatalogKind, ToolSpec
from shared.errors import DeadlineExceeded, InternalError, InvalidRequest, ToolbusError
from shared.ids import new_call_id
from shared.outcomes import now_ms
from shared.subjects import Header

log = structlog.get_logger(__name__)

PRIORITY_META = "io.toolbus/priority"  # `_meta` alternatives to the Toolbus-Priority / -Deadline headers
DEADLINE_META = "io.toolbus/deadline_ms"
_Result = TypeVar("_Result", bound=types.Result)


@dataclass
class MeshView:
    """What the gateway knows of the mesh, kept current by the registry watch."""

    tools: dict[str, ToolSpec] = field(default_factory=dict)
    catalog: CatalogIndex = field(default_factory=CatalogIndex)
    principals: dict[str, Principal] = field(default_factory=dict)  # by key hash
    roles: dict[str, Role] = field(default_factory=dict)


class McpFrontend:
    """The low-level MCP handlers, bound to a mesh view and a bus client."""

    def __init__(self, view: MeshView, client: Callable[[], ToolbusClient], call_timeout_s: float,
                 key: Callable[[], str]) -> None:
        self._view = view
        self._client = client
        self._call_timeout_s = call_timeout_s
        self._key = key  # the caller's API key: the HTTP request's bearer key, or stdio's from the environment
        self._log_levels = SessionLogLevels()

    # --- listing -------------------------------------------------------------------------------

    async def list_tools(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None,
                         ) -> types.ListToolsResult:
        """Every registered tool the caller's roles allow (one page: the registry is small)."""
        return types.ListToolsResult(tools=visible_tools(self._view.tools.values(), self._caller(), self._view.roles))

    async def list_prompts(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None,
                           ) -> types.ListPromptsResult:
        prompts = self._visible(CatalogKind.PROMPT)
        return types.ListPromptsResult(prompts=[types.Prompt.model_validate(d) for d in prompts])

    async def list_resources(self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None,
                             ) -> types.ListResourcesResult:
        resources = self._visible(CatalogKind.RESOURCE)
        return types.ListResourcesResult(resources=[types.Resource.model_validate(d) for d in resources])

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        templates = self._visible(CatalogKind.TEMPLATE)
        return types.ListResourceTemplatesResult(
            resource_templates=[types.ResourceTemplate.model_validate(d) for d in templates])

    def _visible(self, kind: CatalogKind) -> list[dict[str, Any]]:
        return visible_entries(self._view.catalog.of_kind(kind), self._caller(), self._view.roles)

    def _caller(self) -> Principal:
        try:
            return caller(self._caller_key(), self._view.principals)
        except ToolbusError as refused:
            raise gateway_error(refused) from None

    def _caller_key(self) -> str:
        try:
            return self._key()
        except ToolbusError as refused:
            raise gateway_error(refused) from None

    # --- requests over the bus -----------------------------------------------------------------

    async def call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams,
                        ) -> types.CallToolResult:
        """One bus call with the caller's key; the router decides whether it may run."""
        level = _meta_value(ctx, types.LOG_LEVEL_META_KEY) or self._log_levels.of(ctx)
        meta, session = with_log_level(_forwarded_meta(ctx), level), _header(ctx, Header.SESSION)
        relay = ClientRelay(ctx, level)

        async def report(progress: dict[str, Any]) -> None:
            await ctx.session.report_progress(progress["progress"], progress.get("total"), progress.get("message"))

        return await self._over_bus(ctx, params.name, types.CallToolResult, lambda hop: self._client().call(
            params.name, params.arguments or {}, session=session, meta=meta, on_progress=report,
            on_log=relay.log if level else None, on_input=relay.ask if relay.can_answer else None, **hop.options()))

    async def set_logging_level(self, ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams,
                                ) -> types.EmptyResult:
        """`logging/setLevel` (2025-11-25): the session's later calls bring their log lines at that level."""
        self._caller()  # an unknown key is refused here too
        self._log_levels.set(ctx, params.level)
        return types.EmptyResult()

    async def get_prompt(self, ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams,
                         ) -> types.GetPromptResult:
        arguments = params.arguments or {}
        return await self._over_bus(ctx, params.name, types.GetPromptResult, lambda hop: self._client().get_prompt(
            params.name, arguments, **hop.options()))

    async def read_resource(self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams,
                            ) -> types.ReadResourceResult:
        return await self._over_bus(ctx, params.uri, types.ReadResourceResult, lambda hop: self._client(
        ).read_resource(params.uri, **hop.options()))

    async def _over_bus(
        self, ctx: ServerRequestContext[Any], target: str, shape: type[_Result],
        send: Callable[[_Hop], Awaitable[CallResult]],
    ) -> _Result:
        """Send one bus request and give its result in `shape`, its refusal as the same JSON-RPC error.

        Every request gets a deadline (the client's, or the gateway's own wait), so nothing runs
        after the gateway stopped waiting for it. A cancelled handler cancels the bus call.
        """
        hop = _Hop(call_id=new_call_id(), api_key=self._caller_key(), priority=_priority(ctx),
                   deadline_ms=_deadline(ctx) or now_ms() + int(self._call_timeout_s * 1000))
        try:
            result = await send(hop)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):  # the handler is being cancelled: tell the mesh first
                await self._client().cancel(hop.call_id)
            log.info("gateway.call_cancelled", call_id=hop.call_id, target=target)
            raise
        except ToolbusError as refused:
            raise gateway_error(refused) from None
        except TimeoutError:
            raise gateway_error(DeadlineExceeded("no result before the call's deadline")) from None
        except Exception:  # noqa: BLE001  # logged with its traceback by _internal_error
            raise _internal_error("gateway.call_failed", target) from None
        try:
            return shape.model_validate(bus_result(result))
        except ValidationError:  # a result of the wrong shape: the caller must not see pydantic's text
            raise _internal_error("gateway.bad_result", target) from None


@dataclass(frozen=True)
class _Hop:
    """How one client request travels the bus: its call id, the caller's key, priority and deadline."""

    call_id: str
    api_key: str
    priority: int | None
    deadline_ms: int

    def options(self) -> dict[str, Any]:
        """The `ToolbusClient` keyword arguments; the wait ends a moment after the deadline."""
        timeout_s = max(0.1, (self.deadline_ms - now_ms()) / 1000) + 1.0
        return {"call_id": self.call_id, "api_key": self.api_key, "priority": self.priority,
                "deadline": self.deadline_ms, "timeout_s": timeout_s, "raise_on_error": False}


def _internal_error(event: str, target: str) -> MCPError:
    """An unexpected failure, logged with its traceback; the client gets only the correlation id."""
    correlation_id = uuid.uuid4().hex
    log.exception(event, target=target, correlation_id=correlation_id)
    return gateway_error(InternalError(correlation_id))


def _forwarded_meta(ctx: ServerRequestContext[Any]) -> dict[str, Any] | None:
    """The client's `_meta` (as it came on the wire) for the backend, without what only concerns
    the gateway's own hop: its progress token and toolbus's routing keys."""
    meta = (ctx.params or {}).get("_meta")
    if not isinstance(meta, Mapping):
        return None
    kept = {k: v for k, v in meta.items() if k not in {"progressToken", PRIORITY_META, DEADLINE_META}}
    return kept or None


def _header(ctx: ServerRequestContext[Any], name: str) -> str | None:
    """A header of the HTTP request that carried this MCP request (None over stdio)."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get(name) if headers is not None else None
    return str(value) if value else None


def _meta_value(ctx: ServerRequestContext[Any], key: str) -> Any:
    meta = (ctx.params or {}).get("_meta")
    return meta.get(key) if isinstance(meta, Mapping) else None


def _priority(ctx: ServerRequestContext[Any]) -> int | None:
    """`Toolbus-Priority` header or `_meta["io.toolbus/priority"]`, 0 (critical) … 3 (low)."""
    raw = _header(ctx, Header.PRIORITY) or _meta_value(ctx, PRIORITY_META)
    if raw is None:
        return None
    if str(raw) not in {"0", "1", "2", "3"}:
        raise gateway_error(InvalidRequest(f"priority must be 0, 1, 2 or 3, not {str(raw)[:20]!r}"))
    return int(raw)


def _deadline(ctx: ServerRequestContext[Any]) -> int | None:
    """`Toolbus-Deadline` header or `_meta["io.toolbus/deadline_ms"]`: epoch ms after which it must not run."""
    raw = _header(ctx, Header.DEADLINE) or _meta_value(ctx, DEADLINE_META)
    if raw is None:
        return None
    if not str(raw).isascii() or not str(raw).isdigit():
        raise gateway_error(InvalidRequest(f"deadline must be epoch milliseconds, not {str(raw)[:20]!r}"))
    return int(raw)

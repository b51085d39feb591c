"""What a running tool sends the MCP client that called it: log lines and questions.

The executor relays a backend's `notifications/message` to `toolbus.log.<call_id>` and its
`sampling/createMessage` / `elicitation/create` requests to `toolbus.input.<call_id>`; the
gateway's `tools/call` handler follows both (`ToolbusClient.call(on_log=, on_input=)`) and
passes them to its own client on the request's stream, as the backend would have directly.

Log lines: a 2026-07-28 client opts in per request (`_meta["io.modelcontextprotocol/logLevel"]`),
which the gateway forwards as it came; a 2025-11-25 client sets a level for its session with
`logging/setLevel`, which the gateway adds to each of that session's calls. A backend logs only
for calls that opted in, so a call nobody wants logs of costs nothing.

Questions: only a 2025-11-25 session can take a server-to-client request in the middle of a
call. A 2026-07-28 client would need an `InputRequiredResult` round trip, which the gateway
does not relay yet; such a client, or one that did not declare the capability, gets the tool
an error saying so rather than a hang.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast, get_args

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types import LOG_LEVEL_META_KEY as LOG_LEVEL_META  # "io.modelcontextprotocol/logLevel"
from pydantic import BaseModel, ValidationError

from shared.errors import CallFailed

LOG_LEVELS: tuple[types.LoggingLevel, ...] = get_args(types.LoggingLevel)  # in severity order, lowest first
SESSION_HEADER = "mcp-session-id"
STDIO_SESSION = ""  # the one session a stdio gateway serves
MAX_SESSIONS = 10_000  # log levels remembered (oldest forgotten first: a forgotten session just stops getting logs)

_CAPABILITY: dict[str, types.ClientCapabilities] = {
    "sampling/createMessage": types.ClientCapabilities(sampling=types.SamplingCapability()),
    "elicitation/create": types.ClientCapabilities(elicitation=types.ElicitationCapability()),
}


class SessionLogLevels:
    """The level each 2025-11-25 MCP session asked for with `logging/setLevel` (none: no log lines)."""

    def __init__(self) -> None:
        self._levels: OrderedDict[str, types.LoggingLevel] = OrderedDict()

    def set(self, ctx: ServerRequestContext[Any], level: types.LoggingLevel) -> None:
        key = _session_key(ctx)
        self._levels[key] = level
        self._levels.move_to_end(key)
        while len(self._levels) > MAX_SESSIONS:
            self._levels.popitem(last=False)

    def of(self, ctx: ServerRequestContext[Any]) -> types.LoggingLevel | None:
        return self._levels.get(_session_key(ctx))


def with_log_level(meta: dict[str, Any] | None, level: types.LoggingLevel | None) -> dict[str, Any] | None:
    """The `_meta` to forward: the session's level added, unless the request chose its own."""
    if level is None or (meta and LOG_LEVEL_META in meta):
        return meta
    return {**(meta or {}), LOG_LEVEL_META: level}


class ClientRelay:
    """Passes one call's log lines and questions to the MCP client that made the call."""

    def __init__(self, ctx: ServerRequestContext[Any], log_level: types.LoggingLevel | None) -> None:
        self._ctx = ctx
        self._threshold = LOG_LEVELS.index(log_level) if log_level in LOG_LEVELS else None

    @property
    def can_answer(self) -> bool:
        """Whether the client declared any capability a tool's question needs (else none is relayed)."""
        return any(self._ctx.session.check_client_capability(c) for c in _CAPABILITY.values())

    async def log(self, params: dict[str, Any]) -> None:
        """One log line of the call, at or above the level the client asked for."""
        level = params.get("level")
        if self._threshold is None or level not in LOG_LEVELS or LOG_LEVELS.index(level) < self._threshold:
            return
        # On the request's own stream (the 2026-07-28 wire allows no other); `send_log_message`
        # would gate on the same level, but warns that logging is deprecated at 2026-07-28.
        notification = types.LoggingMessageNotification(params=types.LoggingMessageNotificationParams(
            level=cast("types.LoggingLevel", level), data=params.get("data"), logger=params.get("logger")))
        await self._ctx.session.send_notification(notification, related_request_id=self._ctx.request_id)

    async def ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Ask the client what the tool asked of its caller; its answer, or `CallFailed` for the tool."""
        session = self._ctx.session
        capability = _CAPABILITY.get(method)
        if capability is None:
            raise CallFailed(types.METHOD_NOT_FOUND, f"toolbus does not relay {method} to MCP clients")
        if not session.check_client_capability(capability):
            raise CallFailed(types.INVALID_REQUEST, f"the MCP client did not declare the capability {method} needs")
        if not session.can_send_request:
            raise CallFailed(types.INVALID_REQUEST, f"the MCP client's connection cannot take {method} in the middle "
                             "of a call (toolbus relays it to 2025-11-25 sessions)")
        try:
            request, shape = _typed(method, params)
            result = await session.send_request(
                request, shape, metadata=ServerMessageMetadata(related_request_id=self._ctx.request_id))
        except ValidationError:
            raise CallFailed(types.INVALID_PARAMS, f"malformed {method} request or answer") from None
        except MCPError as error:
            raise CallFailed(error.error.code, error.error.message) from None
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _typed(method: str, params: dict[str, Any]) -> tuple[types.ServerRequest, type[BaseModel]]:
    """The SDK's request model for a relayed question, and the result model to expect."""
    if method == "elicitation/create":
        return types.ElicitRequest.model_validate({"method": method, "params": params}), types.ElicitResult
    request = types.CreateMessageRequest.model_validate({"method": method, "params": params})
    shape = types.CreateMessageResultWithTools if request.params.tools else types.CreateMessageResult
    return request, shape


def _session_key(ctx: ServerRequestContext[Any]) -> str:
    """The MCP session a request belongs to: its `Mcp-Session-Id` over HTTP, the only one over stdio."""
    headers = getattr(ctx.request, "headers", None)
    value = headers.get(SESSION_HEADER) if headers is not None else None
    return str(value) if value else STDIO_SESSION

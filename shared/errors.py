"""Errors a call can end with, each mapped to one JSON-RPC code of DESIGN.md §5.

    ToolbusError                      -32603 internal_error (the generic, correlation-id-only case)
    ├── CallRefused                   (the call was never executed)
    │   ├── ParseError                -32700 parse_error
    │   ├── InvalidRequest            -32600 invalid_request
    │   ├── UnknownTool               -32601 unknown_tool
    │   ├── InvalidArguments          -32602 invalid_arguments
    │   ├── Unauthenticated           -32001 unauthenticated
    │   ├── Forbidden                 -32003 forbidden
    │   ├── BudgetExceeded            -32010 budget_exceeded
    │   ├── RateLimited               -32029 rate_limited
    │   ├── CircuitOpen               -32050 circuit_open
    │   └── Overloaded                -32053 overloaded
    ├── BackendError                  -32603 backend_error (data.backend_code is the backend's code)
    ├── DeadlineExceeded              -32008 deadline_exceeded
    ├── DeadLettered                  -32060 dead_lettered
    ├── Cancelled                     -32800 cancelled (MCP's request-cancelled code)
    └── ContextError                  (a `toolbus.ctx.*` request refused; no call involved)
        ├── SessionNotFound           -32004 session_not_found (unknown, deleted or expired)
        ├── VersionConflict           -32009 version_conflict (data.current_version)
        └── ContextTooLarge           -32013 context_too_large (data.limit, data.size)

A malformed `toolbus.ctx.*` request is answered with InvalidRequest (-32600) and the reason.

A service raises these; its boundary turns them into a JSON-RPC error object with
`data: {reason, call_id, ...}`. Anything else that escapes becomes `InternalError` carrying
only a correlation id: a caller never sees `repr()` of an exception.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import ValidationError


class Reason(StrEnum):
    """Machine-readable reasons carried in `error.data.reason`."""

    PARSE_ERROR = "parse_error"  # body is not JSON
    INVALID_REQUEST = "invalid_request"  # JSON, but not a valid tools/call request or headers
    UNKNOWN_TOOL = "unknown_tool"  # no such public tool in the registry
    INVALID_ARGUMENTS = "invalid_arguments"  # arguments fail the inputSchema or limits
    UNAUTHENTICATED = "unauthenticated"  # missing or unknown API key
    FORBIDDEN = "forbidden"  # the principal's roles do not allow the tool
    BUDGET_EXCEEDED = "budget_exceeded"  # a budget scope would be crossed
    RATE_LIMITED = "rate_limited"  # rpm/tpm limit reached
    DEADLINE_EXCEEDED = "deadline_exceeded"  # deadline passed before or during execution
    CIRCUIT_OPEN = "circuit_open"  # the backend's breaker is open
    OVERLOADED = "overloaded"  # pool backlog above its bound
    DEAD_LETTERED = "dead_lettered"  # retries exhausted, call parked in the DLQ
    CANCELLED = "cancelled"  # cancelled by the producer
    BACKEND_ERROR = "backend_error"  # the backend answered with a JSON-RPC error, not a tool result
    SESSION_NOT_FOUND = "session_not_found"  # no such context session (never made, deleted or expired)
    VERSION_CONFLICT = "version_conflict"  # `if_version` is not the session's current version
    CONTEXT_TOO_LARGE = "context_too_large"  # a block, session or render budget is over a limit
    INTERNAL_ERROR = "internal_error"  # a bug or an unexpected failure; see the correlation id


class ToolbusError(Exception):
    """Base of every error that is answered to a producer as a JSON-RPC error."""

    code: ClassVar[int] = -32603
    reason: ClassVar[Reason] = Reason.INTERNAL_ERROR

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_jsonrpc(self, call_id: str) -> dict[str, Any]:
        """The JSON-RPC `error` member for this failure of a call."""
        error = self.error_object()
        error["data"]["call_id"] = call_id  # extras never mask it
        return error

    def error_object(self) -> dict[str, Any]:
        """The JSON-RPC error object without a call id (context-store requests have none)."""
        return {"code": self.code, "message": self.message, "data": {**self.data, "reason": self.reason.value}}


class InternalError(ToolbusError):
    """An unexpected failure; the caller gets only a correlation id to quote."""

    def __init__(self, correlation_id: str) -> None:
        super().__init__("internal error", correlation_id=correlation_id)


class BackendError(ToolbusError):
    """The backend answered with a JSON-RPC error instead of a tool result."""

    reason = Reason.BACKEND_ERROR


class CallRefused(ToolbusError):
    """A call refused before anything was executed."""


class ParseError(CallRefused):
    code = -32700
    reason = Reason.PARSE_ERROR


class InvalidRequest(CallRefused):
    code = -32600
    reason = Reason.INVALID_REQUEST


class UnknownTool(CallRefused):
    code = -32601
    reason = Reason.UNKNOWN_TOOL


class InvalidArguments(CallRefused):
    code = -32602
    reason = Reason.INVALID_ARGUMENTS


class Unauthenticated(CallRefused):
    code = -32001
    reason = Reason.UNAUTHENTICATED


class Forbidden(CallRefused):
    code = -32003
    reason = Reason.FORBIDDEN


class BudgetExceeded(CallRefused):
    code = -32010
    reason = Reason.BUDGET_EXCEEDED


class RateLimited(CallRefused):
    code = -32029
    reason = Reason.RATE_LIMITED


class CircuitOpen(CallRefused):
    code = -32050
    reason = Reason.CIRCUIT_OPEN


class Overloaded(CallRefused):
    code = -32053
    reason = Reason.OVERLOADED


class DeadlineExceeded(ToolbusError):
    code = -32008
    reason = Reason.DEADLINE_EXCEEDED


class DeadLettered(ToolbusError):
    code = -32060
    reason = Reason.DEAD_LETTERED


class Cancelled(ToolbusError):
    code = -32800
    reason = Reason.CANCELLED


class ContextError(ToolbusError):
    """A context-store request refused; answered as a JSON-RPC error like a call's."""


class SessionNotFound(ContextError):
    code = -32004
    reason = Reason.SESSION_NOT_FOUND


class VersionConflict(ContextError):
    code = -32009
    reason = Reason.VERSION_CONFLICT


class ContextTooLarge(ContextError):
    code = -32013
    reason = Reason.CONTEXT_TOO_LARGE


ERRORS_BY_CODE: dict[int, type[ToolbusError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        UnknownTool,
        InvalidArguments,
        Unauthenticated,
        Forbidden,
        BudgetExceeded,
        RateLimited,
        DeadlineExceeded,
        CircuitOpen,
        Overloaded,
        DeadLettered,
        Cancelled,
        SessionNotFound,
        VersionConflict,
        ContextTooLarge,
        InternalError,
    )
}


def first_problem(error: ValidationError, whole: str) -> str:
    """`<field path>: <what is wrong>` for the first problem pydantic found (`whole` when it is the input itself)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or whole
    return f"{where}: {first['msg']}"


class CallFailed(Exception):
    """Raised by the client SDK when a call ends with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data or {}

    @property
    def reason(self) -> str:
        """The `data.reason` string of the error, e.g. `forbidden`."""
        return str(self.data.get("reason", ""))


class ContextRefused(CallFailed):
    """Raised by the context SDK when the store refuses a request (`reason`, `code` as for calls)."""

    @property
    def current_version(self) -> int | None:
        """The session's version, on a `version_conflict`: retry with it."""
        version = self.data.get("current_version")
        return int(version) if version is not None else None

"""Pydantic models of every message toolbus puts on the bus: the source of `contracts/`."""

from shared.contracts.events import CallStatus, Event, EventKind
from shared.contracts.jsonrpc import ErrorData, JsonRpcError, ToolCallParams, ToolCallRequest, ToolCallResponse
from shared.contracts.registry import RuntimeInfo, ServiceEndpoint, ToolSpec
from shared.contracts.work import Attempt, DeadLetter, WorkItem

__all__ = [
    "Attempt",
    "CallStatus",
    "DeadLetter",
    "ErrorData",
    "Event",
    "EventKind",
    "JsonRpcError",
    "RuntimeInfo",
    "ServiceEndpoint",
    "ToolCallParams",
    "ToolCallRequest",
    "ToolCallResponse",
    "ToolSpec",
    "WorkItem",
]

"""Pydantic models of every message toolbus puts on the bus: the source of `contracts/`."""

from shared.contracts.events import CallStatus, Event, EventKind
from shared.contracts.jsonrpc import ErrorData, JsonRpcError, ToolCallParams, ToolCallRequest, ToolCallResponse
from shared.contracts.registry import (
    BreakerView,
    RuntimeInfo,
    ScaleReply,
    ScaleRequest,
    ServiceEndpoint,
    ToolSpec,
    WorkerBeat,
)
from shared.contracts.work import Attempt, DeadLetter, WorkItem

__all__ = [
    "Attempt",
    "BreakerView",
    "CallStatus",
    "DeadLetter",
    "ErrorData",
    "Event",
    "EventKind",
    "JsonRpcError",
    "RuntimeInfo",
    "ScaleReply",
    "ScaleRequest",
    "ServiceEndpoint",
    "ToolCallParams",
    "ToolCallRequest",
    "ToolCallResponse",
    "ToolSpec",
    "WorkItem",
    "WorkerBeat",
]

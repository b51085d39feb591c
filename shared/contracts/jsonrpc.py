"""MCP payloads on the bus: JSON-RPC 2.0 exactly as the MCP spec has them.

Producers publish a `tools/call` request to `toolbus.call`; the final answer on
`toolbus.result.<call_id>` is the JSON-RPC response for the producer's own `id`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

RequestId = StrictStr | StrictInt
"""JSON-RPC request id as MCP allows it: a string or an integer, never null."""


class ToolCallParams(BaseModel):
    """`params` of an MCP `tools/call` request."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, description="Public tool name, `<server>__<tool>`.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Tool arguments.")
    meta: dict[str, Any] | None = Field(default=None, alias="_meta", description="MCP request _meta.")


class ToolCallRequest(BaseModel):
    """The body a producer publishes to `toolbus.call`."""

    model_config = ConfigDict(extra="forbid")

    jsonrpc: Literal["2.0"]
    id: RequestId
    method: Literal["tools/call"]
    params: ToolCallParams


class ErrorData(BaseModel):
    """`error.data` of every toolbus JSON-RPC error."""

    model_config = ConfigDict(extra="allow")

    reason: str = Field(description="Machine-readable reason, e.g. `forbidden`.")
    call_id: str = Field(description="The call id the error belongs to.")


class JsonRpcError(BaseModel):
    """A JSON-RPC error object with a code from DESIGN.md §5."""

    code: int
    message: str
    data: ErrorData


class ToolCallResponse(BaseModel):
    """The body of a final result: exactly one of `result` (an MCP CallToolResult) or `error`."""

    model_config = ConfigDict(extra="forbid")

    jsonrpc: Literal["2.0"] = "2.0"
    id: RequestId | None = Field(description="The producer's request id; null only if it was unreadable.")
    result: dict[str, Any] | None = Field(
        default=None, description="MCP CallToolResult: content, structuredContent, isError, _meta."
    )
    error: JsonRpcError | None = None

"""MCP payloads on the bus: JSON-RPC 2.0 exactly as the MCP spec has them.

Producers publish a `tools/call` request to `toolbus.call` (or `resources/read` or
`prompts/get`: a backend's resources and prompts travel the same way, with the same auth,
routing and audit); the final answer on `toolbus.result.<call_id>` is the JSON-RPC response
for the producer's own `id`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class ResourceReadParams(BaseModel):
    """`params` of an MCP `resources/read` request: the backend's own URI, unchanged."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    uri: str = Field(min_length=1, description="The resource URI as `resources/list` shows it.")
    meta: dict[str, Any] | None = Field(default=None, alias="_meta", description="MCP request _meta.")


class ResourceReadRequest(BaseModel):
    """A `resources/read` request published to `toolbus.call`."""

    model_config = ConfigDict(extra="forbid")

    jsonrpc: Literal["2.0"]
    id: RequestId
    method: Literal["resources/read"]
    params: ResourceReadParams


class PromptGetParams(BaseModel):
    """`params` of an MCP `prompts/get` request."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, description="Public prompt name, `<server>__<prompt>`.")
    arguments: dict[str, StrictStr] = Field(default_factory=dict, description="Prompt arguments (strings).")
    meta: dict[str, Any] | None = Field(default=None, alias="_meta", description="MCP request _meta.")


class PromptGetRequest(BaseModel):
    """A `prompts/get` request published to `toolbus.call`."""

    model_config = ConfigDict(extra="forbid")

    jsonrpc: Literal["2.0"]
    id: RequestId
    method: Literal["prompts/get"]
    params: PromptGetParams


BusRequest = Annotated[ToolCallRequest | ResourceReadRequest | PromptGetRequest, Field(discriminator="method")]
"""Anything a producer may publish to `toolbus.call`, told apart by `method`."""
BUS_METHODS = ("tools/call", "resources/read", "prompts/get")


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
        default=None, description="The MCP result of the request: a CallToolResult (content, structuredContent, "
        "isError, _meta), a ReadResourceResult or a GetPromptResult."
    )
    error: JsonRpcError | None = None

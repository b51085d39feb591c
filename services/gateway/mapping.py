"""Bus ↔ MCP: what the registry and the bus hold, in the shapes an MCP client expects.

Pure functions, no I/O. The gateway adds nothing and drops nothing a client could use: a tool
is listed with the backend's own description, schemas and annotations, and a call's result is
the backend's CallToolResult (every content item, `structuredContent`, `isError`, `_meta`). A
bus refusal becomes the MCP error with the same JSON-RPC code, message and `data` (the wire
contract's `reason` and `call_id`, never internals).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from shared.client import CallResult
from shared.config import Principal, Role
from shared.contracts import CatalogEntry, JsonRpcError, ToolSpec
from shared.errors import ToolbusError
from shared.policy import is_allowed  # the router's own rule, so the two can never disagree


def mcp_tool(spec: ToolSpec) -> types.Tool:
    """A registered tool as `tools/list` shows it: its public name and the backend's own metadata."""
    annotations = types.ToolAnnotations.model_validate(spec.annotations) if spec.annotations else None
    return types.Tool(
        name=spec.public_name,
        title=spec.title,
        description=spec.description,
        input_schema=spec.input_schema,
        output_schema=spec.output_schema,
        annotations=annotations,
    )


def visible_tools(specs: Iterable[ToolSpec], principal: Principal, roles: Mapping[str, Role]) -> list[types.Tool]:
    """The tools a principal may call, by name: a caller never learns of a tool it may not call."""
    allowed = (spec for spec in specs if is_allowed(principal, roles, spec.public_name))
    return [mcp_tool(spec) for spec in sorted(allowed, key=lambda spec: spec.public_name)]


def visible_entries(entries: Iterable[CatalogEntry], principal: Principal, roles: Mapping[str, Role],
                    ) -> list[dict[str, Any]]:
    """The backend's own definitions of the prompts, resources or templates a principal may use."""
    return [entry.definition for entry in entries if is_allowed(principal, roles, entry.public_name)]


def bus_result(result: CallResult) -> dict[str, Any]:
    """The MCP result of a bus request as the backend gave it; a bus error is raised as the
    matching `MCPError`. A tool's own failure (`isError: true`) is a result, not an error, as in MCP.
    """
    error = result.response.error
    if error is not None:
        raise bus_error(error)
    return result.result


def bus_error(error: JsonRpcError) -> MCPError:
    """A bus JSON-RPC error as the MCP error a client sees: same code, message and data."""
    return MCPError(error.code, error.message, error.data.model_dump())


def gateway_error(error: ToolbusError) -> MCPError:
    """A failure the gateway itself decides (no bus result), in the same shape as a bus error."""
    body = error.error_object()
    return MCPError(body["code"], body["message"], body["data"])

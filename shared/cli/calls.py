"""`toolbus call` and `toolbus tools`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, parse_assignment, resolve_bus
from shared.client import CallResult, ToolbusClient, ToolbusUnavailable
from shared.contracts import ToolSpec
from shared.registry import Registry, RegistryNotReady

EXIT_ERROR = 1  # the call ended with a JSON-RPC error (refused, failed, timed out)
EXIT_TOOL_ERROR = 4  # the tool ran and reported isError: true

console = Console()


def call(
    tool: Annotated[str, typer.Argument(help="Public tool name, e.g. time__get_current_time.")],
    assignments: Annotated[list[str] | None, typer.Argument(help="Arguments as key=value (values parse as JSON).")]
    = None,
    api_key: Annotated[str, typer.Option("--key", envvar="TOOLBUS_API_KEY", help="API key.")] = "",
    priority: Annotated[int | None, typer.Option(min=0, max=3, help="0 critical .. 3 low.")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the result.")] = 60.0,
    session: Annotated[str | None, typer.Option(help="Context session the result is filed into (a TOOL block).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole JSON-RPC response.")] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Call one tool through the bus and print its MCP result (exit 1 on error, 4 on a tool error)."""
    arguments = dict(parse_assignment(pair) for pair in assignments or [])
    url, prefix = resolve_bus(nats_url, data_dir)
    try:
        result = asyncio.run(_call(url, prefix, api_key, tool, arguments, CallOptions(priority, timeout_s, session)))
    except ToolbusUnavailable as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    _print_result(result, as_json)
    if result.response.error is not None:
        raise typer.Exit(EXIT_ERROR)
    if result.is_error:
        raise typer.Exit(EXIT_TOOL_ERROR)


@dataclass(frozen=True)
class CallOptions:
    """How `toolbus call` sends one call."""

    priority: int | None
    timeout_s: float
    session: str | None


async def _call(url: str, prefix: str, key: str, tool: str, arguments: dict[str, Any],
                options: CallOptions) -> CallResult:
    async with ToolbusClient(url, key, prefix=prefix, timeout_s=options.timeout_s) as client:
        return await client.call(tool, arguments, priority=options.priority, session=options.session,
                                 raise_on_error=False)


def _print_result(result: CallResult, as_json: bool) -> None:
    if as_json:
        print(result.response.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        return
    error = result.response.error
    if error is not None:
        console.print(f"[red]error {error.code} ({error.data.reason}):[/red] {error.message}")
        return
    structured = result.structured_content
    print(json.dumps(structured, indent=2, ensure_ascii=False) if structured is not None else result.text)


def tools(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry entries as JSON.")] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List the registered tools: name, pool, arguments and description."""
    url, _prefix = resolve_bus(nats_url, data_dir)
    try:
        specs = asyncio.run(_registered_tools(url))
    except RegistryNotReady as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
        return
    table = Table("tool", "pool", "arguments", "description")
    for spec in specs:
        table.add_row(spec.public_name, spec.pool, schema_summary(spec.input_schema),
                      (spec.description or "").split("\n")[0][:80])
    console.print(table)


async def _registered_tools(url: str) -> list[ToolSpec]:
    nc = await connect_once(url)
    try:
        registry = await Registry.open(nc.jetstream())
        return sorted((await registry.tools()).values(), key=lambda s: s.public_name)
    finally:
        await nc.close()


def schema_summary(schema: dict[str, Any]) -> str:
    """`name: type` per property, required ones first and unmarked, optional ones with `?`."""
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    ordered = sorted(properties, key=lambda name: (name not in required, name))
    return ", ".join(f"{n}{'' if n in required else '?'}: {properties[n].get('type', 'any')}" for n in ordered)


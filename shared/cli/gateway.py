"""`toolbus gateway`: the running mesh as one MCP server, for clients that launch a command (stdio)
or connect to a URL (streamable HTTP; `toolbus up` already serves one at `gateway_url`)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, resolve_bus
from shared.errors import Unauthenticated
from shared.telemetry import configure_logging

if TYPE_CHECKING:
    from services.gateway.app import GatewayService

API_KEY_ENV = "TOOLBUS_API_KEY"
console = Console(stderr=True)  # stdout is the MCP channel in stdio mode


def gateway(
    stdio: Annotated[bool, typer.Option("--stdio", help=f"Serve one client over stdin/stdout with ${API_KEY_ENV}.")
                     ] = False,
    host: Annotated[str, typer.Option(help="HTTP listen address (loopback turns on Origin checks).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP listen port (0: any free port).")] = 8765,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Serve every tool, prompt and resource of the running mesh to MCP clients, with each caller's own key."""
    from services.gateway.app import GatewayService, GatewaySettings  # noqa: PLC0415  # the SDK server loads only here

    url, prefix = resolve_bus(nats_url, data_dir)
    configure_logging("gateway", level="warning" if stdio else "info")
    service = GatewayService(GatewaySettings(url, prefix, "gateway-cli", host, port))
    if not stdio:
        asyncio.run(_serve_http(service))
        return
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        console.print(f"[red]--stdio needs an API key in ${API_KEY_ENV}[/red]")
        raise typer.Exit(2)
    try:
        asyncio.run(_serve_stdio(service, key))
    except Unauthenticated as refused:
        console.print(f"[red]{refused.message} (from ${API_KEY_ENV})[/red]")
        raise typer.Exit(2) from None


async def _serve_stdio(service: GatewayService, key: str) -> None:
    try:
        await service.serve_stdio(key)
    finally:
        await service.stop()


async def _serve_http(service: GatewayService) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop taking requests and drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    console.print(f"MCP gateway at {service.url}")
    try:
        await stop.wait()
    finally:
        await service.stop()

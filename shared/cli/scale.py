"""`toolbus scale POOL N`: change the number of local worker processes of a running `toolbus up`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from rich.console import Console

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, resolve_bus
from shared.contracts import ScaleReply, ScaleRequest
from shared.subjects import Subjects

console = Console()
SCALE_TIMEOUT_S = 120.0  # new workers must start and answer /readyz; old ones drain


def scale(
    pool: Annotated[str, typer.Argument(help="The pool to scale.")],
    workers: Annotated[int, typer.Argument(min=0, max=64, help="How many worker processes it should have.")],
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Start or drain worker processes of POOL until it has N (on the host running `toolbus up`)."""
    url, prefix = resolve_bus(nats_url, data_dir)
    try:
        reply = asyncio.run(request_scale(url, prefix, ScaleRequest(pool=pool, workers=workers)))
    except (NoRespondersError, NatsTimeoutError):
        console.print("[red]no `toolbus up` answers on this bus: is the mesh running here?[/red]")
        raise typer.Exit(1) from None
    if reply.error:
        console.print(f"[red]{reply.error}[/red]")
        raise typer.Exit(1)
    console.print(f"pool {reply.pool}: {reply.before} → {reply.after} workers")


async def request_scale(url: str, prefix: str, request: ScaleRequest) -> ScaleReply:
    nc = await connect_once(url)
    try:
        msg = await nc.request(Subjects(prefix).mesh("scale"), request.model_dump_json().encode(),
                               timeout=SCALE_TIMEOUT_S)
    finally:
        await nc.close()
    return ScaleReply.model_validate_json(msg.data)

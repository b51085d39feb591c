"""`toolbus status`: per pool, workers, queues, dead letters, breakers, rate and latency."""

from __future__ import annotations

import asyncio
from typing import Annotated

import nats
import nats.errors
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.cli.budget import print_budgets
from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, resolve_bus
from shared.contracts import StatusReply
from shared.registry import RegistryNotReady
from shared.status import MeshStatus, PoolStatus, collect_status
from shared.subjects import Subjects

EXIT_ERROR = 1
STATUS_TIMEOUT_S = 10.0  # a status against a NATS that accepts but never answers must still end

console = Console()


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole status as JSON.")] = False,
    nats_url: NatsUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show each pool's workers, backlog per priority, ack pending, DLQ, breakers, calls/s and latency."""
    url, prefix = resolve_bus(nats_url, data_dir)
    try:
        mesh = asyncio.run(_collect(url, prefix))
    except (RegistryNotReady, nats.errors.Error, TimeoutError) as error:
        reason = str(error) or f"no answer within {STATUS_TIMEOUT_S:g}s"
        console.print(f"[red]cannot read the mesh status from {escape(url)}: {escape(reason)}[/red]")
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        print(mesh.model_dump_json(indent=2))
        return
    _print_tables(mesh)


async def _collect(url: str, prefix: str) -> MeshStatus:
    async with asyncio.timeout(STATUS_TIMEOUT_S):
        nc = await connect_once(url, name="toolbus-status")
        try:
            return await collect_status(nc, Subjects(prefix))
        finally:
            await nc.close()


def _print_tables(mesh: MeshStatus) -> None:
    if not mesh.pools:
        console.print("no pools serve a backend and no workers are alive")
    for pool in mesh.pools:
        console.print(pool_table(pool))
    if mesh.budgets_ok is False:
        console.print("[red]budget counters were lost: budgeted calls are refused until `toolbus budget rebuild`[/red]")
    if mesh.budgets:
        print_budgets(StatusReply(budgets=mesh.budgets, counters_ok=bool(mesh.budgets_ok)))


def pool_table(pool: PoolStatus) -> Table:
    """One row of numbers under a title naming the pool and how full its queue is."""
    table = Table("workers", "conc", "in flight", "p0", "p1", "p2", "p3", "ack pend", "redeliv", "DLQ",
                  "breakers", "calls/s", "p50 ms", "p99 ms",
                  title=f"pool {pool.pool} — backlog {pool.backlog_total}/{pool.max_backlog}", title_justify="left")
    backlog = [str(lane.backlog) for lane in pool.priorities]
    table.add_row(
        f"{pool.workers_alive}/{pool.workers_configured}", str(pool.concurrency), str(pool.in_flight), *backlog,
        str(sum(lane.ack_pending for lane in pool.priorities)), str(sum(lane.redelivered for lane in pool.priorities)),
        _alert(pool.dlq), _breakers(pool), f"{pool.calls_per_s:g}", _ms(pool.p50_ms), _ms(pool.p99_ms),
    )
    return table


def _breakers(pool: PoolStatus) -> str:
    colours = {"closed": "green", "half_open": "yellow"}
    return " ".join(f"{b.backend}:[{colours.get(b.state, 'red')}]{b.state}[/]" for b in pool.breakers) or "-"


def _alert(count: int) -> str:
    return f"[red]{count}[/red]" if count else "0"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"

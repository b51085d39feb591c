"""`toolbus up`: run the whole mesh in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, runtime_info
from shared.config import Config, ConfigError, load_config
from shared.contracts import RuntimeInfo
from shared.mesh import Mesh

console = Console(stderr=True)


def up(
    config_path: Annotated[Path, typer.Option("--config", help="The toolbus.yaml to run.")] = Path("toolbus.yaml"),
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Start embedded NATS and Redis (unless configured), every service and worker; stop on Ctrl-C."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        console.print(f"[red]{error}[/red]", highlight=False)
        raise typer.Exit(1) from None
    running = runtime_info(data_dir)
    if running is not None and _alive(running.pid):
        console.print(f"[red]a mesh (pid {running.pid}) already runs with data dir {data_dir}[/red]")
        raise typer.Exit(1)
    asyncio.run(run_mesh(config, data_dir.resolve()))


async def run_mesh(config: Config, data_dir: Path) -> None:
    """Start the mesh, show where everything is, wait for a stop signal, drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    mesh = Mesh(config, data_dir)
    try:
        with console.status("starting toolbus…"):
            info = await mesh.start()
        console.print(_summary(info, data_dir))
        await stop.wait()
        console.print("stopping: draining services…")
    finally:
        await mesh.stop()
    console.print("stopped")


def _summary(info: RuntimeInfo, data_dir: Path) -> Table:
    table = Table("process", "pid", "health", title=f"toolbus is up — NATS {info.nats_url}, Redis {info.redis_url}",
                  caption=f"runtime: {data_dir / 'runtime.json'} · logs: {data_dir / 'logs'} · Ctrl-C stops")
    for service in info.services:
        table.add_row(service.name, str(service.pid), f"{service.http_url}/readyz")
    return table


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

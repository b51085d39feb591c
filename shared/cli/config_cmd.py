"""`toolbus config check FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shared.config import ConfigError, load_config

console = Console(stderr=True)


def check(path: Annotated[Path, typer.Argument(help="The toolbus.yaml to validate.")]) -> None:
    """Validate a config file; print each problem with the path of the bad field (exit 1 if any)."""
    try:
        config = load_config(path)
    except ConfigError as error:
        console.print(f"[red]{error}[/red]", highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"[green]{path}: ok[/green] ({len(config.servers)} servers, {len(config.pools)} pools, "
        f"{len(config.principals)} principals, {len(config.roles)} roles)",
        highlight=False,
    )

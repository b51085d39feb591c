"""Options and lookups shared by CLI commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import nats
import nats.errors
import typer
from nats.aio.client import Client as NatsClient
from rich.console import Console
from rich.markup import escape

from shared.contracts import RuntimeInfo
from shared.mesh import RUNTIME_FILE
from shared.subjects import DEFAULT_PREFIX

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where `toolbus up` keeps its state.")]
NatsUrl = Annotated[str | None, typer.Option("--nats-url", help="NATS URL (default: TOOLBUS_NATS_URL, then "
                                             "the running mesh's runtime.json, then nats://127.0.0.1:4222).")]
DEFAULT_DATA_DIR = Path(".toolbus")


def runtime_info(data_dir: Path) -> RuntimeInfo | None:
    """What a running `toolbus up` wrote about itself, if it runs."""
    path = data_dir / RUNTIME_FILE
    return RuntimeInfo.model_validate_json(path.read_text()) if path.exists() else None


def resolve_bus(nats_url: str | None, data_dir: Path) -> tuple[str, str]:
    """The NATS URL and subject prefix to talk to: flag, environment, runtime.json, default."""
    info = runtime_info(data_dir)
    prefix = os.environ.get("TOOLBUS_PREFIX") or (info.prefix if info else DEFAULT_PREFIX)
    url = nats_url or os.environ.get("TOOLBUS_NATS_URL") or (info.nats_url if info else "nats://127.0.0.1:4222")
    return url, prefix


async def connect_once(url: str, name: str = "toolbus-cli") -> NatsClient:
    """Connect for one CLI command, failing fast: `shared.bus.connect` retries forever, right for
    services, not for a command someone waits on. A dead NATS exits 1 with the URL and the reason.

    nats-py quirks: `max_reconnect_attempts=0` retries forever too, and `allow_reconnect=False` still
    waits 60 x 2 s on the initial connect; one attempt with a short wait ends in ~0.1 s.
    """

    async def quiet(_error: Exception) -> None:
        return None  # the failure surfaces as NoServersError; per-attempt logs would only be noise

    try:
        return await nats.connect(url, name=name, connect_timeout=2, max_reconnect_attempts=1,
                                  reconnect_time_wait=0.1, error_cb=quiet)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        Console(stderr=True).print(f"[red]cannot reach NATS at {escape(url)}: {escape(reason)} "
                                   "(is `toolbus up` running?)[/red]")
        raise typer.Exit(1) from None


def parse_assignment(pair: str) -> tuple[str, Any]:
    """`key=value` with value read as JSON when it parses (`n=3`, `flag=true`), else as a string."""
    key, sep, raw = pair.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected key=value, got {pair!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw

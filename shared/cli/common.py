"""Options and lookups shared by CLI commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

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


def parse_assignment(pair: str) -> tuple[str, Any]:
    """`key=value` with value read as JSON when it parses (`n=3`, `flag=true`), else as a string."""
    key, sep, raw = pair.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected key=value, got {pair!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw

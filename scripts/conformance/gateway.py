"""The MCP conformance suite through the gateway, compared with the same backend tested directly.

    .venv/bin/python scripts/conformance/gateway.py [--json PATH] [--scenario NAME ...]   # or: make conformance

Runs the suite's tools-*, resources-* and prompts-* scenarios four times, each by run.py:
directly against the fixture backend (services.conformance_backend) and through the gateway,
each on the default wire (the 2025-11-25 initialize handshake) and on 2026-07-28 (stateless).

The mesh behind the gateway is built here, in this process: an embedded nats-server and
redis-server, then budget accountant, router, one executor and the gateway, as `toolbus up` would
run them. Its one server, `conformance`, is the fixture app served in-process with `prefix: ""`,
so tools and prompts keep the bare names the scenarios call. (Served by URL instead, the backend
gives the same results: the executor's session to it is 2026-07-28 either way.) One principal holds a fresh API key
and a role allowing `*`. The suite cannot send an Authorization header, so bearer.cjs is preloaded
into its Node process to add one (the gateway's own auth stays as it is: 401 without a key).

Prints a table, scenario by wire, direct against gateway, and writes every result, with the
suite's check messages, to bench/results/conformance.json. Logs of the mesh go to
.toolbus/conformance/mesh.log.

Exit status: 0 when every scenario that passes directly also passes through the gateway;
1 when one does not, or a run could not happen; 2 when setup.sh has not been run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx2
import structlog

# run.py sits beside this file; run as a script, this file's directory is on sys.path.
from run import DEFAULT_PREFIXES, RunnerError, require_setup

from services.budget.app import BudgetService, BudgetSettings
from services.executor.app import ExecutorService, ExecutorSettings
from services.gateway.app import GatewayService, GatewaySettings
from services.router.app import RouterService, RouterSettings
from shared.config import Config, hash_api_key, parse_config
from shared.embedded import NatsServer, NatsServerSettings, RedisServer, RedisServerSettings
from shared.mesh import bootstrap

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN_PY = HERE / "run.py"
BEARER_PRELOAD = HERE / "bearer.cjs"
RESULTS = ROOT / "bench" / "results" / "conformance.json"
MESH_LOG = ROOT / ".toolbus" / "conformance" / "mesh.log"

PREFIX = "conformance"  # the mesh's subject prefix (the mesh is this script's alone)
SERVER = "conformance"
BACKEND_APP = "services.conformance_backend.server:app"
KEY_ENV = "TOOLBUS_CONFORMANCE_KEY"
ORIGIN_ENV = "TOOLBUS_CONFORMANCE_ORIGIN"
REGISTERED_TIMEOUT_S = 60.0
PASSED = "pass"


@dataclass(frozen=True)
class Wire:
    """A protocol revision to run the suite at: its label, and run.py's --spec-version (None: the suite's default)."""

    label: str
    spec_version: str | None


WIRES = (Wire("2025-11-25", None), Wire("2026-07-28", "2026-07-28"))
TARGETS = ("direct", "gateway")


# The mesh behind the gateway


def mesh_config(key: str) -> Config:
    """One backend with bare names, one principal allowed everything; budgets and audit left at their defaults."""
    return parse_config({
        "prefix": PREFIX,
        "servers": {SERVER: {"app": BACKEND_APP, "prefix": ""}},
        "principals": [{"name": "conformance", "key_sha256": hash_api_key(key), "roles": ["conformance"]}],
        "roles": {"conformance": {"allow": ["*"]}},
    }, source="<conformance>")


def configure_logs(sink: TextIO) -> None:
    """Mesh logs to a file: the suite's PASS/FAIL lines are what the terminal is for."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(stream=sink, level=logging.INFO, force=True)  # uvicorn's and the SDK's own loggers


@contextlib.asynccontextmanager
async def embedded_servers(scratch: Path) -> AsyncIterator[tuple[str, str]]:
    """nats-server and redis-server for the run; yields their URLs."""
    nats = NatsServer(NatsServerSettings(data_dir=scratch / "nats"))
    redis = RedisServer(RedisServerSettings(data_dir=scratch / "redis", appendonly=False))
    async with contextlib.AsyncExitStack() as stack:
        for server in (nats, redis):
            await asyncio.to_thread(server.start)  # blocks until its log says ready
            stack.push_async_callback(asyncio.to_thread, server.stop)
        yield nats.url, redis.url


@contextlib.asynccontextmanager
async def gateway_mesh(scratch: Path, config: Config) -> AsyncIterator[str]:
    """Accountant, router, executor and gateway on embedded servers; yields the gateway's MCP URL."""
    async with embedded_servers(scratch) as (nats_url, redis_url), contextlib.AsyncExitStack() as stack:
        await bootstrap(nats_url, config)
        budget = BudgetService(BudgetSettings(nats_url, PREFIX, "budget-conformance", redis_url))
        executor = ExecutorService(ExecutorSettings(nats_url, "default", PREFIX, "executor-conformance", redis_url))
        router = RouterService(RouterSettings(nats_url, PREFIX, "router-conformance"))
        for service in (budget, executor, router):
            await service.start()
            stack.push_async_callback(service.stop)
        # The gateway reads the registry when it connects: start it once the backend is listed there.
        async with asyncio.timeout(REGISTERED_TIMEOUT_S):
            await executor.worker.backends[SERVER].registered.wait()
        gateway = GatewayService(GatewaySettings(nats_url, PREFIX, "gateway-conformance", port=0))
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        yield gateway.url


async def check_auth(url: str, key: str) -> dict[str, int]:
    """The gateway refuses an initialize without a key (401) and takes it with one (200).

    Shows that a pass through the gateway means the preload's header got there: the gateway's
    auth was on for the whole run, not relaxed for it.
    """
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                             "clientInfo": {"name": "conformance-auth-check", "version": "0"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(timeout=10) as http:
        without = await http.post(url, json=initialize, headers=accept)
        with_key = await http.post(url, json=initialize, headers=accept | {"Authorization": f"Bearer {key}"})
    statuses = {"without_key": without.status_code, "with_key": with_key.status_code}
    if statuses != {"without_key": 401, "with_key": 200}:
        raise RunnerError(f"the gateway's auth is not as expected (want 401 then 200): {statuses}")
    return statuses


# Running the suite (run.py, one process per target and wire)


def bearer_env(url: str, key: str) -> dict[str, str]:
    """The environment that makes the suite's Node process send the key, and only to the gateway."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    node_options = " ".join(filter(None, [os.environ.get("NODE_OPTIONS"), f'--require "{BEARER_PRELOAD}"']))
    return {**os.environ, "NODE_OPTIONS": node_options, KEY_ENV: key, ORIGIN_ENV: origin}


async def run_suite(target: Sequence[str], wire: Wire, args: argparse.Namespace, report: Path,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run.py run (its PASS/FAIL lines go straight to the terminal); its JSON report.

    An asyncio subprocess, not subprocess.run: the gateway under test runs on this event loop.
    """
    command = [sys.executable, str(RUN_PY), *target, "--json", str(report), "--timeout", str(args.timeout)]
    command += ["--spec-version", wire.spec_version] if wire.spec_version else []
    command += [arg for name in args.scenario or [] for arg in ("--scenario", name)]
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
    if await process.wait() != 0:
        raise RunnerError(f"run.py {' '.join(target)} at {wire.label} exited with {process.returncode}")
    return read_report(report)


def read_report(path: Path) -> dict[str, Any]:
    """run.py's --json report: per scenario its outcome, and the checks behind it."""
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def run_direct(args: argparse.Namespace, scratch: Path) -> dict[str, dict[str, Any]]:
    """Both wires against the fixture backend alone (run.py starts and stops it)."""
    reports = {}
    for wire in WIRES:
        banner(f"direct, {wire.label}")
        reports[wire.label] = await run_suite(["--direct"], wire, args, scratch / f"direct-{wire.label}.json")
    return reports


async def run_gateway(args: argparse.Namespace, scratch: Path, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Both wires through the gateway, on a mesh started for them and stopped after."""
    key = secrets.token_urlsafe(32)
    reports = {}
    async with gateway_mesh(scratch, mesh_config(key)) as url:
        info["gateway_auth_check"] = await check_auth(url, key)
        for wire in WIRES:
            banner(f"gateway {url}, {wire.label}")
            reports[wire.label] = await run_suite(
                ["--url", url], wire, args, scratch / f"gateway-{wire.label}.json", bearer_env(url, key))
    return reports


# Comparing and reporting


def compare(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per wire and scenario: each target's outcome, and whether the gateway lost a direct pass."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for wire in WIRES:
        direct, gateway = (results[target][wire.label]["scenarios"] for target in TARGETS)
        table[wire.label] = {
            name: {"direct": direct[name], "gateway": gateway.get(name, "missing"),
                   "regression": direct[name] == PASSED and gateway.get(name) != PASSED}
            for name in direct
        }
    return table


def regressions(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    return [f"{name} @ {wire}" for wire, rows in table.items() for name, row in rows.items() if row["regression"]]


def reason(results: dict[str, dict[str, dict[str, Any]]], wire: str, name: str) -> str:
    """Why the gateway run of a scenario did not pass: run.py's reason (the first failing check)."""
    details = results["gateway"][wire]["details"].get(name, {})
    return str(details.get("reason") or "")


def print_table(table: dict[str, dict[str, dict[str, Any]]], results: dict[str, dict[str, dict[str, Any]]]) -> None:
    labels = [wire.label for wire in WIRES]
    names = list(dict.fromkeys(name for rows in table.values() for name in rows))
    width = max(len(name) for name in names)
    banner("direct / gateway, per wire (! marks a scenario that passes directly but not through the gateway)")
    print(f"{'scenario':<{width}}  " + "  ".join(f"{label:<17}" for label in labels))
    for name in names:
        cells = [cell(table[label].get(name)) for label in labels]
        print(f"{name:<{width}}  " + "  ".join(f"{c:<17}" for c in cells))
    for lost in regressions(table):
        name, _, wire = lost.partition(" @ ")
        print(f"! {lost}: {reason(results, wire, name)}")


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    mark = "!" if row["regression"] else " "
    return f"{row['direct']:>7} / {row['gateway']:<7}{mark}"


def write_report(path: Path, info: dict[str, Any], results: dict[str, dict[str, dict[str, Any]]],
                 table: dict[str, dict[str, dict[str, Any]]]) -> None:
    document = {"run": info, "comparison": table, "regressions": regressions(table), "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", metavar="NAME", help="only these (repeatable); "
                        f"default: every scenario starting with {', '.join(DEFAULT_PREFIXES)}")
    parser.add_argument("--timeout", type=int, default=60, metavar="SECONDS", help="per scenario (default 60)")
    parser.add_argument("--json", type=Path, default=RESULTS, metavar="PATH", help=f"default: {RESULTS}")
    return parser.parse_args(argv)


async def run_all(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="conformance-gateway-") as scratch:
        direct = await run_direct(args, Path(scratch))
        gateway = await run_gateway(args, Path(scratch), info)
    return {"direct": direct, "gateway": gateway}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "wires": {wire.label: wire.spec_version or "suite default" for wire in WIRES},
                            "backend": BACKEND_APP, "mesh_log": str(MESH_LOG.relative_to(ROOT))}
    MESH_LOG.parent.mkdir(parents=True, exist_ok=True)
    try:
        require_setup()
        with MESH_LOG.open("w", encoding="utf-8") as sink:
            configure_logs(sink)
            results = asyncio.run(run_all(args, info))
    except RunnerError as error:
        print(f"gateway.py: {error}", file=sys.stderr)
        return error.exit_code
    table = compare(results)
    print_table(table, results)
    write_report(args.json, info, results, table)
    print(f"\nresults: {args.json}; mesh log: {MESH_LOG}")
    lost = regressions(table)
    print(f"{len(lost)} scenario(s) pass directly but not through the gateway" if lost else
          "every scenario that passes directly passes through the gateway")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

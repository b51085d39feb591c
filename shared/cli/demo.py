"""`toolbus demo` (what `make demo` runs): a real mesh, a mixed batch of real calls, a summary.

It starts embedded NATS and Redis, the router and a worker pool fronting mcp-server-git (on
a throwaway repository it creates), mcp-server-time and the demo tools; runs calls that
succeed, fail as tools, and are refused (unknown tool, forbidden, invalid arguments); prints
counts by status and latency percentiles; stops everything; exits 0 only if every call got
the status it should.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx2
import nats
import typer
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from nats.aio.client import Client as NatsClient
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from shared.audit.notes import SigningKey, VerifierKey
from shared.audit.reader import read_log, unrecorded_events
from shared.audit.verifier import Report, VerifyOptions, verify_log
from shared.budget_client import BudgetClient
from shared.client import ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.contracts import StatusRequest
from shared.contracts.context import BlockType, NewBlock
from shared.mesh import Mesh, audit_key_path
from shared.outcomes import now_ms
from shared.subjects import Subjects

DEMO_KEY = "demo-key-not-a-secret"
INTERN_KEY = "demo-intern-key-not-a-secret"  # a principal with a $0.003 budget, to show refusals
HANDOFF_BUDGET = 300  # tokens the planner's and the reviewer's renders must fit
AUDIT_WAIT_S = 60.0  # the audit writer records and checkpoints every event of the demo well within this
INTERN_CALLS = 5  # at $0.001 each against $0.003: three run, two are refused with -32010
console = Console()


@dataclass(frozen=True)
class PlannedCall:
    """One call of the demo batch and the status it must end with."""

    tool: str
    arguments: dict[str, Any]
    expect: str


@dataclass(frozen=True)
class Outcome:
    call: PlannedCall
    status: str
    seconds: float


def demo(
    rounds: Annotated[int, typer.Option(help="How many times the mixed batch runs.")] = 5,
    concurrency: Annotated[int, typer.Option(help="Calls in flight at once.")] = 8,
) -> None:
    """Start a real mesh, run a mixed batch of real calls, print a summary, stop (exit 0 if all as expected)."""
    outcomes, audit_ok = asyncio.run(run_demo(rounds, concurrency))
    console.print(summary_table(outcomes))
    wrong = [o for o in outcomes if o.status != o.call.expect]
    for outcome in wrong:
        console.print(f"[red]{outcome.call.tool}: expected {outcome.call.expect}, got {outcome.status}[/red]")
    if not audit_ok:
        console.print("[red]demo failed: the audit log did not verify, the context handoff differed, "
                      "or the gateway did not work[/red]")
    console.print(f"[green]demo ok: {len(outcomes)} calls, every one ended as expected, context handed off, "
                  "audit log verified[/green]"
                  if not wrong and audit_ok else f"[red]demo failed: {len(wrong)} calls ended unexpectedly[/red]")
    raise typer.Exit(1 if wrong or not audit_ok else 0)


async def run_demo(rounds: int, concurrency: int) -> tuple[list[Outcome], bool]:
    with tempfile.TemporaryDirectory(prefix="toolbus-demo-") as tmp:
        repo = make_repository(Path(tmp) / "repo")
        mesh = Mesh(demo_config(repo), Path(tmp) / "data")
        try:
            with console.status("starting the mesh: NATS, Redis, router, workers, MCP servers…"):
                info = await mesh.start()
            console.print(f"mesh up: NATS {info.nats_url} · {len(info.services)} service processes")
            outcomes = await run_batch(info.nats_url, plan(repo, rounds), concurrency)
            outcomes += await run_budgeted(info.nats_url)
            handoff, handoff_ok = await run_handoff(info.nats_url, repo)
            gateway_ok = await run_gateway(str(info.gateway_url), repo)
            log_key = SigningKey.parse(audit_key_path(mesh.config, mesh.data_dir).read_text()).verifier
            audit_ok = await verify_audit(info.nats_url, log_key)
            return outcomes + handoff, audit_ok and handoff_ok and gateway_ok
        finally:
            with console.status("stopping the mesh…"):
                await mesh.stop()


async def run_gateway(url: str, repo: Path) -> bool:
    """An MCP client (the official SDK) uses the mesh through the gateway: lists the demo role's tools,
    gets progress from a long tool and reads git history; True if all of it worked."""
    steps: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        steps.append(progress)

    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = (await client.list_tools()).tools
        await client.call_tool("demo__progress", {"steps": 4, "delay_ms": 20}, progress_callback=on_progress)
        log = await client.call_tool("git__git_log", {"repo_path": str(repo), "max_count": 2})
    ok = steps == [1, 2, 3, 4] and not log.is_error and "demo__crash" not in {t.name for t in tools}
    console.print(f"gateway: MCP client at {url} saw {len(tools)} tools for its role, {len(steps)} progress "
                  f"notifications, git history over the bus{'' if ok else ' [red](unexpected)[/red]'}")
    return ok


async def verify_audit(nats_url: str, log_key: VerifierKey) -> bool:
    """Wait until every event is recorded and checkpointed, then verify the whole audit log."""
    nc = await nats.connect(nats_url)
    try:
        with console.status("waiting for the audit log to record and checkpoint every event…"):
            report = await _checkpointed_report(nc, log_key)
    finally:
        await nc.close()
    chains = ", ".join(f"{chain}: {count}" for chain, count in report.chains.items())
    console.print(f"audit: {report.records} records ({chains}), {report.checkpoints} signed checkpoints, "
                  f"verified {'ok' if report.ok else 'FAILED'} in {report.elapsed_s:.2f} s")
    for finding in report.findings:
        console.print(f"[red]audit {finding.check.value} at seq {finding.seq}: {finding.message}[/red]")
    return report.ok


async def _checkpointed_report(nc: NatsClient, log_key: VerifierKey) -> Report:
    """The report once the audit consumer is drained and no record is after the newest checkpoint."""
    subjects, js = Subjects(), nc.jetstream()
    async with asyncio.timeout(AUDIT_WAIT_S):
        while True:
            snapshot = await read_log(js, subjects, "main")
            report = verify_log(snapshot.records, snapshot.checkpoints, snapshot.policies,
                                VerifyOptions(log_key, "main", subjects, now_ms=now_ms()))
            settled = report.records and not report.unsigned_count and not await unrecorded_events(js, "main")
            if not report.ok or settled:
                return report
            await asyncio.sleep(0.2)


def plan(repo: Path, rounds: int) -> list[PlannedCall]:
    """The mixed batch: real tools on three servers, a tool error, and three kinds of refusal."""
    batch = [
        PlannedCall("time__get_current_time", {"timezone": "Europe/Paris"}, "ok"),
        PlannedCall("time__convert_time", {"source_timezone": "UTC", "time": "12:00",
                                           "target_timezone": "Asia/Tokyo"}, "ok"),
        PlannedCall("git__git_status", {"repo_path": str(repo)}, "ok"),
        PlannedCall("git__git_log", {"repo_path": str(repo), "max_count": 5}, "ok"),
        PlannedCall("demo__echo", {"text": "hello, bus"}, "ok"),
        PlannedCall("demo__summarize", {"text": "toolbus carries MCP tool calls over NATS " * 4}, "ok"),
        PlannedCall("demo__sleep_ms", {"ms": 20}, "ok"),
        PlannedCall("demo__fail", {"message": "a tool error, returned as isError"}, "tool_error"),
        PlannedCall("demo__does_not_exist", {}, "rejected"),
        PlannedCall("git__git_commit", {"repo_path": str(repo), "message": "nope"}, "rejected"),
        PlannedCall("demo__echo", {"text": 42}, "rejected"),
    ]
    return batch * rounds


async def run_batch(nats_url: str, calls: list[PlannedCall], concurrency: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)
    async with ToolbusClient(nats_url, DEMO_KEY, timeout_s=60) as client:
        with Progress(console=console) as progress:
            task = progress.add_task("calling tools", total=len(calls))

            async def one(planned: PlannedCall) -> Outcome:
                async with gate:
                    started = time.perf_counter()
                    result = await client.call(planned.tool, planned.arguments, raise_on_error=False)
                    progress.advance(task)
                    return Outcome(planned, result.status.value, time.perf_counter() - started)

            return list(await asyncio.gather(*(one(c) for c in calls)))


async def run_budgeted(nats_url: str) -> list[Outcome]:
    """The intern's calls one after another: the first three fit the $0.003 budget, the rest are refused."""
    calls = [PlannedCall("demo__echo", {"text": f"paid call {n}"}, "ok" if n < 3 else "rejected")
             for n in range(INTERN_CALLS)]
    outcomes = []
    async with ToolbusClient(nats_url, INTERN_KEY, timeout_s=60) as client:
        for planned in calls:
            started = time.perf_counter()
            result = await client.call(planned.tool, planned.arguments, raise_on_error=False)
            outcomes.append(Outcome(planned, result.status.value, time.perf_counter() - started))
    nc = await nats.connect(nats_url)
    try:
        [budget] = (await BudgetClient(nc, Subjects()).status(StatusRequest(scope="user:intern"))).budgets
    finally:
        await nc.close()
    refused = sum(o.status == "rejected" for o in outcomes)
    console.print(f"budget: user:intern spent ${Decimal(budget.spent_micros) / 10**6} of "
                  f"${Decimal(budget.limit_micros or 0) / 10**6}; {refused} further calls refused (-32010)")
    return outcomes


async def run_handoff(nats_url: str, repo: Path) -> tuple[list[Outcome], bool]:
    """A planner builds a context session (two real tool results filed into it), hands it to a reviewer."""
    calls = [PlannedCall("git__git_log", {"repo_path": str(repo), "max_count": 2}, "ok"),
             PlannedCall("time__get_current_time", {"timezone": "UTC"}, "ok")]
    async with ToolbusClient(nats_url, DEMO_KEY, timeout_s=60) as client:
        ctx = client.context
        session = await ctx.create("planner", user_id="demo", blocks=[
            NewBlock(type=BlockType.SYSTEM, content="You review the repository's recent history."),
            NewBlock(type=BlockType.USER, content="What changed in the repo today?")])
        outcomes = []
        for planned in calls:
            started = time.perf_counter()
            result = await client.call(planned.tool, planned.arguments, session=session.session_id)
            outcomes.append(Outcome(planned, result.status.value, time.perf_counter() - started))
        await _until_filed(client, session.session_id, len(calls))
        reviewer = await ctx.import_package(await ctx.export(session.session_id), "reviewer")
        mine = await ctx.render(session.session_id, HANDOFF_BUDGET)
        theirs = await ctx.render(reviewer.session_id, HANDOFF_BUDGET)
    same = mine.text.encode() == theirs.text.encode()
    console.print(f"context: {len(reviewer.blocks)} blocks ({reviewer.metrics.total_tokens} tokens, 2 tool results "
                  f"filed automatically) handed from planner to reviewer; renders "
                  f"{'identical' if same else 'DIFFERENT'} at a {HANDOFF_BUDGET}-token budget")
    return outcomes, same


async def _until_filed(client: ToolbusClient, session_id: str, tool_results: int) -> None:
    """Wait (bounded) until the context store has filed the session's tool results: it does so asynchronously."""
    async with asyncio.timeout(AUDIT_WAIT_S):
        while True:
            session = await client.context.get(session_id)
            if sum(b.type is BlockType.TOOL for b in session.blocks) >= tool_results:
                return
            await asyncio.sleep(0.05)


def summary_table(outcomes: list[Outcome]) -> Table:
    """Calls by status with p50/p99 latency, as the demo prints them."""
    table = Table("status", "calls", "p50 ms", "p99 ms", title="toolbus demo: calls by status")
    by_status: dict[str, list[float]] = {}
    for outcome in outcomes:
        by_status.setdefault(outcome.status, []).append(outcome.seconds * 1000)
    for status, latencies in sorted(by_status.items()):
        table.add_row(status, str(len(latencies)), f"{percentile(latencies, 50):.1f}",
                      f"{percentile(latencies, 99):.1f}")
    everything = [o.seconds * 1000 for o in outcomes]
    table.add_row("all", str(len(outcomes)), f"{percentile(everything, 50):.1f}", f"{percentile(everything, 99):.1f}")
    tools = Counter(o.call.tool.split("__")[0] for o in outcomes)
    table.caption = "by server: " + ", ".join(f"{name} {count}" for name, count in sorted(tools.items()))
    return table


def percentile(values: list[float], pct: float) -> float:
    """The pct-th percentile (inclusive method); 0 for no values."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def make_repository(path: Path) -> Path:
    """A git repository with two commits for mcp-server-git to read."""
    path.mkdir(parents=True)
    git = ["git", "-C", str(path), "-c", "user.name=toolbus demo", "-c", "user.email=demo@toolbus.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    for number in (1, 2):
        (path / "NOTES.md").write_text(f"toolbus demo note {number}\n")
        subprocess.run([*git, "add", "NOTES.md"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"demo commit {number}"], check=True)
    return path


def demo_config(repo: Path) -> Config:
    """Three real MCP servers in one pool, two principals who may use them read-only, and budgets."""
    python = sys.executable
    return parse_config({
        "servers": {
            "git": {"command": python, "args": ["-m", "mcp_server_git", "--repository", str(repo)]},
            "time": {"command": python, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]},
            "demo": {"command": python, "args": ["-m", "services.demo_tools"]},
        },
        "pools": {"default": {"workers": 1, "concurrency": 16}},
        "principals": [
            {"name": "demo", "key_sha256": hash_api_key(DEMO_KEY), "roles": ["demo"],
             "scope": {"org": "local", "user": "demo"}},
            {"name": "intern", "key_sha256": hash_api_key(INTERN_KEY), "roles": ["demo"],
             "scope": {"org": "local", "user": "intern"}},
        ],
        "roles": {"demo": {"allow": ["time__*", "git__git_status", "git__git_log", "demo__*"],
                           "deny": ["git__git_commit", "demo__crash"]}},
        "tools": {"demo__echo": {"cost_usd": "0.001"},
                  "demo__summarize": {"cost_usd": "0.0005", "model": "demo-extractive-1", "max_tokens": 64}},
        "models": {"demo-extractive-1": {"input_usd_per_mtok": 1, "output_usd_per_mtok": 4}},
        "audit": {"checkpoint_interval_s": 0.5},
        "gateway": {"port": 0},  # any free port: 8765 may be taken by a `make up`
        "budgets": [
            {"scope": "org:local", "limit_usd": 100, "window": "month", "alert_at": [0.8, 0.95]},
            {"scope": "user:demo", "limit_usd": 5, "window": "day"},
            {"scope": "user:intern", "limit_usd": "0.003", "window": "total"},
            {"scope": "key:demo", "rpm": 6000},
        ],
    }, source="<demo>")

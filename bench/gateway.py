"""Gateway overhead benchmark: `demo__echo` via the SDK bus client and via the MCP gateway, same run, same mesh.

Router, executor and gateway run as processes (`shared.mesh.Mesh`, as `toolbus up` runs them and as in
`bench.whole_path`), so this process holds only clients. Two paths to the same tool:

- bus: `ToolbusClient.call`, straight onto NATS;
- gateway: the official MCP client (`ClientSession` over `streamable_http_client`, an httpx2 client sending
  `Authorization: Bearer <key>`), one initialized session kept open, as an agent keeps one.

For the small payload two probes split the difference, on the same gateway:

- raw_http: the same tools/call as a bare httpx2 POST on a session of its own, the SSE reply parsed by hand
  (the gateway's server side and HTTP, without the MCP client SDK);
- ping: an MCP `ping` through the SDK client (HTTP, SSE and both SDK sessions; no tool, no bus call).

Each of 3 rounds makes N calls per path one at a time, alternating path by path (the first path rotates
every step), so the noise of this 2-core machine hits every path alike. Payloads: a ~10-character text and
a 4 KiB one. Each figure is the median of the rounds; the overhead is gateway - bus within each round, then
the median of rounds. Then throughput with 16 calls in flight, bus and gateway in turn (order swapped every
round). Results go to `bench/results/gateway.json`. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from bench.latency import p50_p99_ms
from bench.whole_path import KEY
from bench.whole_path import bench_config as whole_path_config
from shared.client import ToolbusClient
from shared.config import Config, GatewayConfig
from shared.mesh import Mesh

RESULTS = Path(__file__).parent / "results" / "gateway.json"
TOOL = "demo__echo"
ROUNDS = 3
IN_FLIGHT = 16
PAYLOADS = {"small": 0, "4KiB": 4096}  # text characters; 0: `bench <n>`
PROBES = "small"  # the payload whose rounds also run the raw_http and ping probes
WARM_UP_CALLS = 30
VALIDATE_LOOPS = 2000
AUTH = {"Authorization": f"Bearer {KEY}"}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "bench-raw", "version": "0"}}}

Op = Callable[[int], Awaitable[None]]


def bench_config() -> Config:
    """The whole-path bench's mesh (so figures compare), its gateway on a free port (8765 may be in use)."""
    return whole_path_config().model_copy(update={"gateway": GatewayConfig(port=0)})


def echo_text(size: int, index: int) -> str:
    """A text of `size` characters (a short one for 0), different on every call."""
    head = f"bench {index}"
    return head if size == 0 else (head + " " + "x" * size)[:size]


def sse_message(body: str) -> dict[str, Any]:
    """The JSON-RPC message of a reply: the last non-empty SSE `data:` line, or the body if it is plain JSON."""
    data = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
    message: dict[str, Any] = json.loads(next((item for item in reversed(data) if item), body))
    return message


class RawMcp:
    """tools/call as a bare HTTP POST on an MCP session of its own: the gateway without the client SDK."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self._http = http
        self._url = url
        self._headers = dict(MCP_HEADERS)

    async def open(self) -> None:
        """Initialize a session by hand (initialize, then notifications/initialized)."""
        response = await self._http.post(self._url, json=INITIALIZE, headers=self._headers)
        response.raise_for_status()
        version = sse_message(response.text)["result"]["protocolVersion"]
        self._headers |= {"mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": version}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        (await self._http.post(self._url, json=initialized, headers=self._headers)).raise_for_status()

    async def echo(self, index: int, text: str) -> None:
        request = {"jsonrpc": "2.0", "id": index + 1, "method": "tools/call",
                   "params": {"name": TOOL, "arguments": {"text": text}}}
        response = await self._http.post(self._url, json=request, headers=self._headers)
        assert sse_message(response.text)["result"]["structuredContent"] == {"result": text}, response.text[:200]


@contextlib.asynccontextmanager
async def mcp_session(url: str) -> AsyncIterator[ClientSession]:
    """An initialized official-SDK session to the gateway, with the bench's bearer key."""
    async with (
        httpx2.AsyncClient(headers=AUTH, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def path_ops(bus: ToolbusClient, mcp: ClientSession, raw: RawMcp, size: int, *, probes: bool) -> dict[str, Op]:
    """One echo call per path (each checks its echo, so every path does the same work), by path name."""

    async def via_bus(index: int) -> None:
        text = echo_text(size, index)
        assert (await bus.call(TOOL, {"text": text})).structured_content == {"result": text}

    async def via_gateway(index: int) -> None:
        text = echo_text(size, index)
        assert (await mcp.call_tool(TOOL, {"text": text})).structured_content == {"result": text}

    async def via_raw_http(index: int) -> None:
        await raw.echo(index, echo_text(size, index))

    async def ping(index: int) -> None:
        await mcp.send_ping()

    ops: dict[str, Op] = {"bus": via_bus, "gateway": via_gateway}
    return ops | {"raw_http": via_raw_http, "ping": ping} if probes else ops


async def interleaved_round(ops: dict[str, Op], calls: int) -> dict[str, list[float]]:
    """`calls` calls of each op, one at a time, alternating op by op; which op goes first rotates every step."""
    names = list(ops)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(calls):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            await ops[name](index)
            samples[name].append(time.perf_counter() - started)
    return samples


def summary(seconds: list[float]) -> dict[str, float]:
    p50, p99 = p50_p99_ms(seconds)
    return {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "mean_ms": round(statistics.fmean(seconds) * 1000, 2)}


def median_rounds(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each figure over the rounds, and every round's p50/p99 (this machine is noisy)."""
    keys = [key for key in rounds[0] if key.endswith(("_ms", "_per_s"))]
    merged: dict[str, Any] = {key: round(statistics.median(run[key] for run in rounds), 2) for key in keys}
    return merged | {f"runs_{key}": [run[key] for run in rounds] for key in ("p50_ms", "p99_ms", "calls_per_s")
                     if key in rounds[0]}


def overhead(bus: list[dict[str, float]], gateway: list[dict[str, float]]) -> dict[str, Any]:
    """gateway - bus per round (the same round saw the same noise), then the median of rounds."""
    per_round = {key: [round(g[key] - b[key], 2) for b, g in zip(bus, gateway, strict=True)]
                 for key in ("p50_ms", "p99_ms")}
    return {key: round(statistics.median(values), 2) for key, values in per_round.items()} | {
        f"runs_{key}": values for key, values in per_round.items()}


async def sequential(ops: dict[str, dict[str, Op]], calls: int) -> list[dict[str, Any]]:
    """Every payload's interleaved rounds; per payload and path the median of rounds, and the overhead."""
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {
        payload: {name: [] for name in payload_ops} for payload, payload_ops in ops.items()}
    for _ in range(ROUNDS):
        for payload, payload_ops in ops.items():
            for name, seconds in (await interleaved_round(payload_ops, calls)).items():
                rounds[payload][name].append(summary(seconds))
    return [{"payload": payload, "text_chars": len(echo_text(PAYLOADS[payload], calls)),
             "paths": {name: median_rounds(runs) for name, runs in by_path.items()},
             "overhead": overhead(by_path["bus"], by_path["gateway"])}
            for payload, by_path in rounds.items()]


async def throughput(op: Op, calls: int, in_flight: int) -> dict[str, float]:
    """`calls` calls with at most `in_flight` outstanding: calls/s and latency."""
    gate = asyncio.Semaphore(in_flight)

    async def one(index: int) -> float:
        async with gate:
            started = time.perf_counter()
            await op(index)
            return time.perf_counter() - started

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one(i) for i in range(calls)))
    return {"calls_per_s": round(calls / (time.perf_counter() - started), 1), **summary(latencies)}


async def concurrent(ops: dict[str, Op], calls: int) -> dict[str, Any]:
    """Bus then gateway (swapped every round) at `IN_FLIGHT` calls in flight; the median of rounds."""
    rounds: dict[str, list[dict[str, float]]] = {"bus": [], "gateway": []}
    for index in range(ROUNDS):
        for name in ("bus", "gateway") if index % 2 == 0 else ("gateway", "bus"):
            rounds[name].append(await throughput(ops[name], calls, IN_FLIGHT))
    paths = {name: median_rounds(runs) for name, runs in rounds.items()}
    return {"in_flight": IN_FLIGHT, "calls": calls, "paths": paths}


async def validation_ms(mcp: ClientSession) -> float:
    """What the MCP client spends checking one echo result against the tool's outputSchema (jsonschema)."""
    result = await mcp.call_tool(TOOL, {"text": echo_text(0, 0)})
    started = time.perf_counter()
    for _ in range(VALIDATE_LOOPS):
        await mcp.validate_tool_result(TOOL, result)
    return round((time.perf_counter() - started) / VALIDATE_LOOPS * 1000, 4)


def attribution(small: dict[str, Any], validate_ms: float) -> dict[str, Any]:
    """Where the small call's p50 overhead goes, from the interleaved probes (differences of medians)."""
    p50 = {name: figures["p50_ms"] for name, figures in small["paths"].items()}
    return {
        "client_sdk_p50_ms": round(p50["gateway"] - p50["raw_http"], 2),  # MCP client: session, parsing, validation
        "client_output_schema_validation_ms": validate_ms,  # part of the line above, timed directly
        "gateway_server_p50_ms": round(p50["raw_http"] - p50["bus"], 2),  # HTTP + SSE + server SDK + mapping
        "mcp_ping_p50_ms": p50["ping"],  # one empty MCP request: HTTP + SSE + both SDK sessions + bearer check
    }


async def measure(nats_url: str, url: str, calls: int, concurrent_calls: int) -> dict[str, Any]:
    """Both clients (and the raw probe) on one mesh: warm up, then the sequential and concurrent phases."""
    async with (
        ToolbusClient(nats_url, KEY) as bus,
        mcp_session(url) as mcp,
        httpx2.AsyncClient(headers=AUTH, timeout=30) as http,
    ):
        raw = RawMcp(http, url)
        await raw.open()
        ops = {payload: path_ops(bus, mcp, raw, size, probes=payload == PROBES) for payload, size in PAYLOADS.items()}
        for payload_ops in ops.values():  # warm-up: connections, tools/list for the output schema, caches
            await interleaved_round(payload_ops, WARM_UP_CALLS)
        payloads = await sequential(ops, calls)
        loaded = await concurrent(ops[PROBES], concurrent_calls)
        validate = await validation_ms(mcp)
    small = next(figures for figures in payloads if figures["payload"] == PROBES)
    return {"sequential": payloads, "concurrent": loaded, "where_the_overhead_goes": attribution(small, validate)}


async def main(calls: int, concurrent_calls: int) -> dict[str, Any]:
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        mesh = Mesh(bench_config(), Path(tmp))
        try:  # start inside: a service that fails to start must not leave the others running
            info = await mesh.start()
            assert info.gateway_url is not None, "the mesh runs no gateway"
            figures = await measure(info.nats_url, info.gateway_url, calls, concurrent_calls)
        finally:
            await mesh.stop()
    return {"benchmark": f"gateway overhead {TOOL}", "machine": f"{platform.machine()} {platform.processor()}",
            "cores": os.cpu_count(), "python": platform.python_version(),
            "setup": "embedded nats-server; router, executor (1 worker) and gateway as processes; bus client and "
                     "MCP client (official SDK, streamable HTTP, one session) in the bench process",
            "rounds": ROUNDS, "calls_per_round": calls, **figures, "seconds": round(time.perf_counter() - started, 1),
            "load_average_1_5_15_min": {"before": [round(x, 2) for x in load_before],
                                        "after": [round(x, 2) for x in os.getloadavg()]},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_report(result: dict[str, Any]) -> None:
    print(f"{TOOL}, one call at a time: p50 / p99 ms, median of {result['rounds']} interleaved rounds "
          f"of {result['calls_per_round']} calls per path")
    print(f"{'payload':>8}  {'path':>9}  {'p50':>7}  {'p99':>7}")
    for payload in result["sequential"]:
        rows = {**payload["paths"], "overhead": payload["overhead"]}
        for name, figures in rows.items():
            print(f"{payload['payload']:>8}  {name:>9}  {figures['p50_ms']:>7.2f}  {figures['p99_ms']:>7.2f}")
    loaded = result["concurrent"]
    print(f"{loaded['in_flight']} in flight, {loaded['calls']} calls: " + ", ".join(
        f"{name} {figures['calls_per_s']} calls/s (p50 {figures['p50_ms']}, p99 {figures['p99_ms']} ms)"
        for name, figures in loaded["paths"].items()))
    print("where the small call's overhead goes (ms): "
          + ", ".join(f"{key.removesuffix('_ms')} {value}" for key, value in result["where_the_overhead_goes"].items()))
    print(f"load average before {result['load_average_1_5_15_min']['before']}, "
          f"after {result['load_average_1_5_15_min']['after']}")
    print(f"took {result['seconds']} s; written to {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=120, help="sequential calls per path, payload and round")
    parser.add_argument("--concurrent", type=int, default=240,
                        help=f"calls per path and round at {IN_FLIGHT} in flight")
    args = parser.parse_args()
    report = asyncio.run(main(args.calls, args.concurrent))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)

"""Whole-path benchmark: `demo__echo` from the SDK through router and executor processes and back.

Measures calls/s and latency percentiles (the median of 3 runs) for sequential calls and for 64 calls in flight, on
a fresh embedded nats-server, with router and executor as separate processes (as deployed).
Results go to `bench/results/whole_path.json`. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.latency import p50_p99_ms
from shared.client import ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.mesh import Mesh

KEY = "bench-key"
RESULTS = Path(__file__).parent / "results" / "whole_path.json"
REPEATS = 3


def bench_config() -> Config:
    return parse_config({
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]}},
        "pools": {"default": {"workers": 1, "concurrency": 64}},
        "principals": [{"name": "bench", "key_sha256": hash_api_key(KEY), "roles": ["all"]}],
        "roles": {"all": {"allow": ["*"]}},
        "gateway": {"enabled": False},  # not measured here; 8765 may be taken by a `make up`
    }, source="<bench>")


async def timed_call(client: ToolbusClient, index: int) -> float:
    started = time.perf_counter()
    await client.call("demo__echo", {"text": f"bench {index}"})
    return time.perf_counter() - started


async def run_phase(client: ToolbusClient, calls: int, in_flight: int) -> dict[str, Any]:
    """`calls` echo calls with at most `in_flight` outstanding; throughput and latency."""
    gate = asyncio.Semaphore(in_flight)

    async def one(index: int) -> float:
        async with gate:
            return await timed_call(client, index)

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.perf_counter() - started
    p50, p99 = p50_p99_ms(latencies)
    return {"calls": calls, "in_flight": in_flight, "seconds": round(elapsed, 3),
            "calls_per_s": round(calls / elapsed, 1), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}


def median_phase(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, plus every run's throughput (this machine is noisy)."""
    ordered = sorted(runs, key=lambda run: float(run["calls_per_s"]))
    return {**ordered[len(ordered) // 2], "runs_calls_per_s": [run["calls_per_s"] for run in ordered]}


async def main(sequential: int, concurrent: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        mesh = Mesh(bench_config(), Path(tmp))
        info = await mesh.start()
        try:
            async with ToolbusClient(info.nats_url, KEY) as client:
                await run_phase(client, 50, 8)  # warm-up: sessions, caches and sockets
                phases = [median_phase([await run_phase(client, sequential, 1) for _ in range(REPEATS)]),
                          median_phase([await run_phase(client, concurrent, 64) for _ in range(REPEATS)])]
        finally:
            await mesh.stop()
    return {"benchmark": "whole_path demo__echo", "machine": f"{platform.machine()} {platform.processor()}",
            "python": platform.python_version(), "phases": phases,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrent", type=int, default=3000)
    args = parser.parse_args()
    report = asyncio.run(main(args.sequential, args.concurrent))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for phase in report["phases"]:
        print(f"{phase['in_flight']:>3} in flight: {phase['calls']:>5} calls  {phase['calls_per_s']:>8} calls/s  "
              f"p50 {phase['p50_ms']:>7} ms  p99 {phase['p99_ms']:>7} ms")
    print(f"written to {RESULTS}")

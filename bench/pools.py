"""Pool benchmarks: horizontal scaling and priority wait times, with a PNG plot.

(a) scaling: 1, 2 and 4 worker processes of one pool (concurrency 2 each, so a worker is
    bound by the tool's latency, not by this machine's two cores) on `demo__sleep_ms 20`,
    256 calls in flight; throughput per worker count (median of 3 runs) and the 4-vs-1 ratio.
(b) priority: one worker (concurrency 4) saturated by 100 calls of each priority 0..3 at
    once (`demo__sleep_ms 20`); the wait from submit to start per priority (p50).
The demo server runs in-process in each worker (`app: services.demo_tools.server:app`), so the
numbers measure toolbus, not the stdio pipes. Run with `make bench`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.client import ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.mesh import Mesh

KEY = "bench-key"
RESULTS = Path(__file__).parent / "results"
SLEEP_MS = 20
REPEATS = 3


def pool_config(workers: int, concurrency: int) -> Config:
    return parse_config({
        "servers": {"demo": {"app": "services.demo_tools.server:app"}},
        "pools": {"default": {"workers": workers, "concurrency": concurrency, "max_backlog": 100_000}},
        "principals": [{"name": "bench", "key_sha256": hash_api_key(KEY), "roles": ["all"]}],
        "roles": {"all": {"allow": ["*"]}},
        "gateway": {"enabled": False},  # not measured here; 8765 may be taken by a `make up`
    }, source="<bench>")


async def throughput(workers: int, calls: int = 1500, in_flight: int = 256) -> dict[str, Any]:
    """Calls/s of `calls` sleep calls with `in_flight` outstanding, on `workers` processes."""
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        mesh = Mesh(pool_config(workers, concurrency=2), Path(tmp))
        info = await mesh.start()
        try:
            async with ToolbusClient(info.nats_url, KEY) as client:
                gate = asyncio.Semaphore(in_flight)

                async def one() -> None:
                    async with gate:
                        await client.call("demo__sleep_ms", {"ms": SLEEP_MS})

                await asyncio.gather(*(one() for _ in range(100)))  # warm-up
                started = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(calls)))
                elapsed = time.perf_counter() - started
        finally:
            await mesh.stop()
    return {"workers": workers, "calls": calls, "in_flight": in_flight, "calls_per_s": round(calls / elapsed, 1)}


async def priority_waits(per_level: int = 100) -> dict[str, Any]:
    """p50 wait (submit → start) per priority when one worker is saturated by all four at once."""
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        record = Path(tmp) / "record.jsonl"
        os.environ["TOOLBUS_DEMO_RECORD"] = str(record)
        mesh = Mesh(pool_config(1, concurrency=4), Path(tmp))
        info = await mesh.start()
        try:
            submitted = await submit_mixed(info.nats_url, per_level)
        finally:
            await mesh.stop()
            os.environ.pop("TOOLBUS_DEMO_RECORD")
        starts = {e["call_id"]: e["ts"] for e in map(json.loads, record.read_text().splitlines())}
    waits: dict[int, list[float]] = {p: [] for p in range(4)}
    for call_id, (priority, at) in submitted.items():
        waits[priority].append((starts[call_id] - at) * 1000)
    return {"per_level": per_level, "concurrency": 4,
            "p50_wait_ms": {str(p): round(statistics.median(w), 1) for p, w in waits.items()},
            "max_wait_ms": {str(p): round(max(w), 1) for p, w in waits.items()}}


async def submit_mixed(nats_url: str, per_level: int) -> dict[str, tuple[int, float]]:
    """Submit interleaved priorities 3,2,1,0,3,2,… and wait for all; call id → (priority, submit time)."""
    submitted: dict[str, tuple[int, float]] = {}
    async with ToolbusClient(nats_url, KEY) as client:
        for _ in range(per_level):
            for priority in (3, 2, 1, 0):
                at = time.time()
                submitted[await client.submit("demo__sleep_ms", {"ms": SLEEP_MS}, priority=priority)] = (priority, at)
        await asyncio.gather(*(client.wait_result(c, timeout_s=300) for c in submitted))
    return submitted


def plot(scaling: list[dict[str, Any]], priority: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  # optional: only `make bench` needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([s["workers"] for s in scaling], [s["calls_per_s"] for s in scaling], marker="o")
    left.set(title=f"scaling: demo__sleep_ms {SLEEP_MS} ms, 256 in flight", xlabel="worker processes",
             ylabel="calls/s", xticks=[s["workers"] for s in scaling])
    levels = sorted(priority["p50_wait_ms"])
    right.bar(levels, [priority["p50_wait_ms"][p] for p in levels])
    right.set(title="p50 wait by priority (1 saturated worker)", xlabel="priority (0 = critical)", ylabel="ms")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


async def scaling_row(workers: int) -> dict[str, Any]:
    """The median of REPEATS runs (this machine is noisy: single runs vary by ±30%)."""
    runs = [await throughput(workers) for _ in range(REPEATS)]
    rates = sorted(run["calls_per_s"] for run in runs)
    return {**runs[0], "calls_per_s": statistics.median(rates), "runs_calls_per_s": rates}


async def main() -> dict[str, Any]:
    scaling = [await scaling_row(workers) for workers in (1, 2, 4)]
    ratio = round(scaling[-1]["calls_per_s"] / scaling[0]["calls_per_s"], 2)
    priority = await priority_waits()
    return {"scaling": scaling, "scaling_ratio_4_vs_1": ratio, "priority": priority,
            "python": sys.version.split()[0], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    report = asyncio.run(main())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pools.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["scaling"], report["priority"], RESULTS / "pools.png")
    for row in report["scaling"]:
        print(f"{row['workers']} workers: {row['calls_per_s']:>8} calls/s")
    print(f"4 vs 1 workers: {report['scaling_ratio_4_vs_1']}x")
    print("p50 wait by priority (ms):", report["priority"]["p50_wait_ms"])
    print(f"written to {RESULTS / 'pools.json'} and pools.png")

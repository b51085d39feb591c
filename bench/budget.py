"""Budget benchmark: what accounting costs a call.

1. Overhead: reserve + settle round trips to the budget service process (Redis Lua script and a
   ledger event in EVENTS each), sequentially and with 64 pairs in flight; p50/p99 per pair.
2. Whole path: `demo__echo` through router and executor processes with accounting on (the
   principal has org, user and key limits, so every call is reserved and settled) and off.

Each figure is the median of 3 runs. Results go to `bench/results/budget.json`. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats

from bench.latency import p50_p99_ms
from bench.whole_path import REPEATS, median_phase, run_phase
from shared.budget_client import BudgetClient
from shared.client import ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.contracts import ReserveRequest, SettleRequest
from shared.mesh import Mesh
from shared.outcomes import now_ms
from shared.subjects import Subjects

KEY = "bench-key"
RESULTS = Path(__file__).parent / "results" / "budget.json"
SCOPES = ["org:bench", "user:bench", "key:bench"]


def bench_config(*, accounting: bool) -> Config:
    return parse_config({
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]}},
        "pools": {"default": {"workers": 1, "concurrency": 64}},
        "principals": [{"name": "bench", "key_sha256": hash_api_key(KEY), "roles": ["all"],
                        "scope": {"org": "bench", "user": "bench"}}],
        "roles": {"all": {"allow": ["*"]}},
        "gateway": {"enabled": False},  # not measured here; 8765 may be taken by a `make up`
        "tools": {"demo__echo": {"cost_usd": "0.0001"}},
        "budgets": [{"scope": "org:bench", "limit_usd": 1_000_000, "window": "month", "alert_at": [0.8]},
                    {"scope": "user:bench", "limit_usd": 1_000_000, "window": "day"},
                    {"scope": "key:bench", "rpm": 10_000_000}],
        "accounting": {"enabled": accounting},
    }, source="<bench>")


async def reserve_and_settle(budget: BudgetClient) -> float:
    call_id = uuid.uuid4().hex
    started = time.perf_counter()
    reply = await budget.reserve(ReserveRequest(call_id=call_id, principal="bench", scopes=SCOPES,
                                                tools=["demo__echo"], start_by_ms=now_ms() + 60_000, run_ms=30_000))
    assert reply.hold is not None, reply
    settled = await budget.settle(SettleRequest(call_id=call_id, tool="demo__echo"))
    assert settled.changed, settled
    return time.perf_counter() - started


async def overhead_phase(budget: BudgetClient, pairs: int, in_flight: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(in_flight)

    async def one() -> float:
        async with gate:
            return await reserve_and_settle(budget)

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one() for _ in range(pairs)))
    elapsed = time.perf_counter() - started
    p50, p99 = p50_p99_ms(latencies)
    return {"pairs": pairs, "in_flight": in_flight, "pairs_per_s": round(pairs / elapsed, 1),
            "calls_per_s": round(pairs / elapsed, 1), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}


async def with_mesh(config: Config, sequential: int, concurrent: int, pairs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        mesh = Mesh(config, Path(tmp))
        info = await mesh.start()
        try:
            report: dict[str, Any] = {}
            if config.accounting.enabled:
                nc = await nats.connect(info.nats_url)
                budget = BudgetClient(nc, Subjects())
                await overhead_phase(budget, 100, 8)  # warm-up
                report["overhead"] = [median_phase([await overhead_phase(budget, pairs, n) for _ in range(REPEATS)])
                                      for n in (1, 64)]
                await nc.close()
            async with ToolbusClient(info.nats_url, KEY) as client:
                await run_phase(client, 50, 8)
                report["whole_path"] = [
                    median_phase([await run_phase(client, sequential, 1) for _ in range(REPEATS)]),
                    median_phase([await run_phase(client, concurrent, 64) for _ in range(REPEATS)]),
                ]
            return report
        finally:
            await mesh.stop()


async def main(sequential: int, concurrent: int, pairs: int) -> dict[str, Any]:
    on = await with_mesh(bench_config(accounting=True), sequential, concurrent, pairs)
    off = await with_mesh(bench_config(accounting=False), sequential, concurrent, pairs)
    return {"benchmark": "budget accounting", "machine": f"{platform.machine()} {platform.processor()}",
            "python": platform.python_version(), "overhead": on["overhead"],
            "whole_path_budgets_on": on["whole_path"], "whole_path_budgets_off": off["whole_path"],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrent", type=int, default=3000)
    parser.add_argument("--pairs", type=int, default=2000)
    args = parser.parse_args()
    result = asyncio.run(main(args.sequential, args.concurrent, args.pairs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for phase in result["overhead"]:
        print(f"reserve+settle, {phase['in_flight']:>2} in flight: {phase['pairs_per_s']:>8} pairs/s  "
              f"p50 {phase['p50_ms']:>7} ms  p99 {phase['p99_ms']:>7} ms")
    for label in ("on", "off"):
        for phase in result[f"whole_path_budgets_{label}"]:
            print(f"whole path, budgets {label:>3}, {phase['in_flight']:>2} in flight: "
                  f"{phase['calls_per_s']:>8} calls/s  p50 {phase['p50_ms']:>7} ms  p99 {phase['p99_ms']:>7} ms")
    print(f"written to {RESULTS}")

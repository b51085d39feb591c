"""Audit benchmark: how fast records are appended and verified, and what auditing costs a call.

1. Append: EVENTS preloaded with 20,000 events, then 1 (and 2) writer processes started; records/s
   from start to the consumer being drained (each record: RFC 8785 JSON, SHA-256, Ed25519
   signature, one JetStream publish with expected-last-subject-sequence, one ack).
2. Verify: the same log read back and verified (hash, chain, signature, checkpoint roots).
3. Whole path: `demo__echo` through `toolbus up`'s processes with the audit writer on and off
   (accounting off, to isolate audit), sequential and 64 in flight, plus how far the audit log
   lags behind the calls at the end of the concurrent phase.

Each whole-path figure is the median of 3 runs. Results go to `bench/results/audit.json`.
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
from nats.js.errors import NotFoundError

from bench.whole_path import REPEATS, median_phase, run_phase
from shared.audit.notes import SigningKey
from shared.audit.reader import read_all, stream_policy, unrecorded_events
from shared.audit.verifier import VerifyOptions, verify_log
from shared.client import ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.contracts import EventKind
from shared.embedded import NatsServer, NatsServerSettings
from shared.mesh import Mesh, bootstrap, write_key_pair
from shared.outcomes import Outcomes, now_ms
from shared.subjects import Stream, Subjects

KEY = "bench-key"
RESULTS = Path(__file__).parent / "results" / "audit.json"


def bench_config(*, audit: bool, prefix: str = "toolbus") -> Config:
    return parse_config({
        "prefix": prefix,
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]}},
        "pools": {"default": {"workers": 1, "concurrency": 64}},
        "principals": [{"name": "bench", "key_sha256": hash_api_key(KEY), "roles": ["all"],
                        "scope": {"org": "bench", "user": "bench"}}],
        "roles": {"all": {"allow": ["*"]}},
        "gateway": {"enabled": False},  # not measured here; 8765 may be taken by a `make up`
        "accounting": {"enabled": False},
        "audit": {"enabled": audit},
    }, source="<bench>")


async def preload_events(url: str, prefix: str, count: int) -> None:
    nc = await nats.connect(url)
    outcomes = Outcomes(nc, nc.jetstream(), Subjects(prefix), source="bench")
    for start in range(0, count, 500):
        await asyncio.gather(*(outcomes.emit(EventKind.CALL_COMPLETED, call_id=f"bench-{i}", principal="bench",
                                             tool="demo__echo", pool="default", arguments={"text": f"call {i}"})
                               for i in range(start, min(count, start + 500))))
    await nc.close()


async def audit_pending(url: str) -> int:
    """Events the audit writers have not recorded yet (all of them while no writer has started)."""
    nc = await nats.connect(url)
    try:
        return await unrecorded_events(nc.jetstream(), "main")
    except NotFoundError:
        return sys.maxsize
    finally:
        await nc.close()


async def wait_recorded(url: str, poll_s: float = 0.02, limit_s: float = 600) -> None:
    """Poll until the audit consumer is drained (bounded)."""
    for _ in range(int(limit_s / poll_s)):
        if not await audit_pending(url):
            return
        await asyncio.sleep(poll_s)
    raise TimeoutError("the audit writers did not catch up")


async def append_phase(url: str, tmp: Path, writers: int, events: int) -> dict[str, Any]:
    """Records/s of `writers` writer processes draining `events` preloaded events."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    await bootstrap(url, bench_config(audit=True, prefix=prefix))
    key = SigningKey.generate("toolbus-main")
    write_key_pair(key, tmp / f"{prefix}.key")
    await preload_events(url, prefix, events)
    started = time.perf_counter()
    processes = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.audit", "--nats-url", url, "--prefix", prefix, "--instance", f"audit-{n}",
        "--signing-key", str(tmp / f"{prefix}.key"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL) for n in range(writers)]
    try:
        await wait_recorded(url)
        elapsed = time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
            await process.wait()
    verify = await verify_phase(url, prefix, key)
    return {"writers": writers, "events": events, "records_per_s": round(events / elapsed), **verify}


async def fresh_append_phase(writers: int, events: int) -> dict[str, Any]:
    """`append_phase` on a nats-server of its own: streams and the writers' consumer start empty."""
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        server = NatsServer(NatsServerSettings(data_dir=Path(tmp) / "nats"))
        server.start()
        try:
            return await append_phase(server.url, Path(tmp), writers, events)
        finally:
            server.stop()


async def verify_phase(url: str, prefix: str, key: SigningKey) -> dict[str, Any]:
    nc = await nats.connect(url)
    js, subjects = nc.jetstream(), Subjects(prefix)
    started = time.perf_counter()
    records = await read_all(js, Stream.AUDIT, f"{prefix}.audit.>")
    checkpoints = await read_all(js, Stream.AUDIT_CP, subjects.audit_checkpoint("main"))
    policies = [await stream_policy(js, Stream.AUDIT), await stream_policy(js, Stream.AUDIT_CP)]
    read_s = time.perf_counter() - started
    await nc.close()
    report = verify_log(records, checkpoints, policies, VerifyOptions(key.verifier, "main", subjects, now_ms=now_ms()))
    assert report.ok, [f.as_json() for f in report.findings[:5]]
    return {"verified_records": report.records, "read_records_per_s": round(report.records / read_s),
            "verify_records_per_s": round(report.records / report.elapsed_s)}


async def whole_path(audit: bool, sequential: int, concurrent: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        mesh = Mesh(bench_config(audit=audit), Path(tmp))
        info = await mesh.start()
        try:
            async with ToolbusClient(info.nats_url, KEY) as client:
                await run_phase(client, 50, 8)
                phases = [median_phase([await run_phase(client, sequential, 1) for _ in range(REPEATS)]),
                          median_phase([await run_phase(client, concurrent, 64) for _ in range(REPEATS)])]
            if audit:
                started, backlog = time.perf_counter(), await audit_pending(info.nats_url)
                await wait_recorded(info.nats_url)
                phases[-1]["audit_backlog_at_end"] = backlog
                phases[-1]["audit_caught_up_after_s"] = round(time.perf_counter() - started, 3)
            return {"phases": phases}
        finally:
            await mesh.stop()


async def main(events: int, sequential: int, concurrent: int) -> dict[str, Any]:
    append = [await fresh_append_phase(writers, events) for writers in (1, 2)]
    on = await whole_path(True, sequential, concurrent)
    off = await whole_path(False, sequential, concurrent)
    return {"benchmark": "audit", "machine": f"{platform.machine()} {platform.processor()}",
            "python": platform.python_version(), "append": append,
            "whole_path_audit_on": on["phases"], "whole_path_audit_off": off["phases"],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrent", type=int, default=3000)
    args = parser.parse_args()
    result = asyncio.run(main(args.events, args.sequential, args.concurrent))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for phase in result["append"]:
        print(f"append, {phase['writers']} writer(s): {phase['records_per_s']:>7} records/s; verify "
              f"{phase['verify_records_per_s']:>7} records/s (read {phase['read_records_per_s']} records/s)")
    for label in ("on", "off"):
        for phase in result[f"whole_path_audit_{label}"]:
            print(f"whole path, audit {label:>3}, {phase['in_flight']:>2} in flight: {phase['calls_per_s']:>8} calls/s"
                  f"  p50 {phase['p50_ms']:>7} ms  p99 {phase['p99_ms']:>7} ms"
                  + (f"  audit caught up {phase['audit_caught_up_after_s']} s after the last call"
                     if "audit_caught_up_after_s" in phase else ""))
    print(f"written to {RESULTS}")

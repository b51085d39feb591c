"""`toolbus status` against a known state built directly on a real nats-server (no executors run)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.js.api import AckPolicy, ConsumerConfig

from shared.bus import connect
from shared.codec import pack
from shared.contracts import BreakerView, CallStatus, Event, EventKind, WorkerBeat
from shared.embedded import NatsServer
from shared.mesh import bootstrap
from shared.registry import WorkerRoster
from shared.status import MeshStatus, PoolStatus, collect_status
from shared.subjects import Stream, Subjects, work_durable
from tests.conftest import make_config

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SUBJECTS = Subjects()
QUEUED = {0: 3, 3: 5}  # work messages published per priority of pool default
FETCHED_UNACKED = 2  # of priority 3's, delivered to a "worker" that never acks
DEAD_LETTERS = 2
LATENCIES_MS = [10, 20, 30, 40, 50]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def beat(instance: str, pool: str, beat_at_ms: int, in_flight: int, breakers: dict[str, BreakerView]) -> WorkerBeat:
    return WorkerBeat(instance=instance, pool=pool, pid=os.getpid(), concurrency=8, in_flight=in_flight,
                      backends={"demo": True}, breakers=breakers, started_at_ms=beat_at_ms - 5000,
                      beat_at_ms=beat_at_ms)


def completed(i: int, latency_ms: int | None) -> Event:
    detail: dict[str, str | int | float | bool | None] = {} if latency_ms is None else {"latency_ms": latency_ms}
    kind, status = (EventKind.CALL_COMPLETED, CallStatus.OK) if latency_ms else (EventKind.CALL_FAILED,
                                                                                  CallStatus.FAILED)
    return Event(kind=kind, ts_ms=now_ms(), source="test", call_id=f"call-{i}", pool="default", status=status,
                 detail=detail)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def known_state(nats_server: NatsServer, git_repo: Path) -> AsyncIterator[str]:
    """Queues, a DLQ, heartbeats and events with numbers the tests know; yields the NATS URL."""
    await bootstrap(nats_server.url, make_config(git_repo))
    nc = await connect(nats_server.url, name="status-test")
    js = nc.jetstream()
    for priority in range(4):
        config = ConsumerConfig(durable_name=work_durable("default", priority), ack_policy=AckPolicy.EXPLICIT,
                                filter_subject=SUBJECTS.work("default", priority), ack_wait=300)
        await js.add_consumer(Stream.WORK.value, config)
    for priority, count in QUEUED.items():
        for i in range(count):
            await js.publish(SUBJECTS.work("default", priority), f"work {priority}.{i}".encode())
    low = await js.pull_subscribe_bind(work_durable("default", 3), stream=Stream.WORK.value)
    assert len(await low.fetch(FETCHED_UNACKED, timeout=2)) == FETCHED_UNACKED  # delivered, never acked
    for i in range(DEAD_LETTERS):
        await js.publish(SUBJECTS.dlq("default"), f"dead {i}".encode())
    roster = await WorkerRoster.open(js)
    now = now_ms()
    await roster.beat(beat("w-old", "default", now - 2000, 1, {"demo": BreakerView(state="closed", failures=0,
                                                                                  retry_after_ms=0)}))
    await roster.beat(beat("w-new", "default", now, 2, {"demo": BreakerView(state="open", failures=5,
                                                                            retry_after_ms=1200)}))
    await roster.beat(beat("w-legacy", "legacy", now, 0, {}))
    for i, latency in enumerate([*LATENCIES_MS, None]):
        await js.publish(SUBJECTS.event(completed(i, latency).kind.value), pack(completed(i, latency)))
    yield nats_server.url
    await nc.close()


def default_pool(mesh: MeshStatus) -> PoolStatus:
    return next(pool for pool in mesh.pools if pool.pool == "default")


async def test_collector_reports_the_known_state(known_state: str) -> None:
    """Backlog, ack pending, DLQ, workers, the newest breaker view and the latency figures match what was built."""
    nc = await connect(known_state, name="status-test-collector")
    try:
        started = time.monotonic()
        mesh = await collect_status(nc, SUBJECTS)
        elapsed = time.monotonic() - started
    finally:
        await nc.close()
    assert elapsed < 1.0
    assert [pool.pool for pool in mesh.pools] == ["default", "legacy"]  # legacy: live workers, not configured
    pool = default_pool(mesh)
    assert [lane.backlog for lane in pool.priorities] == [3, 0, 0, 5]  # fetched-but-unacked is still stored
    assert [lane.ack_pending for lane in pool.priorities] == [0, 0, 0, FETCHED_UNACKED]
    assert [lane.redelivered for lane in pool.priorities] == [0, 0, 0, 0]
    assert (pool.backlog_total, pool.max_backlog, pool.dlq) == (8, 10000, DEAD_LETTERS)
    assert (pool.workers_alive, pool.workers_configured, pool.concurrency, pool.in_flight) == (2, 1, 32, 3)
    assert [(b.backend, b.state, b.failures, b.retry_after_ms) for b in pool.breakers] == [("demo", "open", 5, 1200)]
    assert 1.0 <= pool.window_s <= 60.0
    assert pool.calls_per_s == pytest.approx(6 / pool.window_s, abs=0.001)  # the failed one counts too
    assert (pool.p50_ms, pool.p99_ms) == (30.0, 50.0)  # nearest rank over 10..50; no-latency event skipped
    legacy = next(p for p in mesh.pools if p.pool == "legacy")
    assert (legacy.workers_alive, legacy.workers_configured, legacy.concurrency, legacy.dlq) == (1, 0, 8, 0)
    assert (legacy.calls_per_s, legacy.p50_ms) == (0.0, None)


async def test_cli_status_json_reports_backlog_and_breakers(known_state: str, tmp_path: Path) -> None:
    """`toolbus status --json` prints the same backlog and breaker fields as the known state."""
    argv = [sys.executable, "-c", "from shared.cli import main; main()", "status", "--json",
            "--nats-url", known_state, "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("TOOLBUS_PREFIX", "TOOLBUS_NATS_URL")}
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    pool = next(p for p in json.loads(done.stdout)["pools"] if p["pool"] == "default")
    assert [lane["backlog"] for lane in pool["priorities"]] == [3, 0, 0, 5]
    assert [lane["ack_pending"] for lane in pool["priorities"]] == [0, 0, 0, FETCHED_UNACKED]
    assert (pool["backlog_total"], pool["dlq"], pool["workers_alive"]) == (8, DEAD_LETTERS, 2)
    assert pool["breakers"] == [{"backend": "demo", "state": "open", "failures": 5, "retry_after_ms": 1200}]
    MeshStatus.model_validate_json(done.stdout)  # the JSON is the documented model, nothing more or less

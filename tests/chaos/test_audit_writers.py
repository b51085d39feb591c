"""Audit writers never fork a chain and record every event exactly once, even when one is SIGKILLed.

Two writer processes share the EVENTS consumer, each on its own chain. One is killed mid-load:
its unacked events are redelivered to the other, whose append of an event already stored is
dropped by the stream's `Nats-Msg-Id` dedupe. It restarts with its key and resumes its own
chain. Then two writers that share one key and chain id race on one chain: the stream's
expected-last-subject-sequence keeps it linear.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter
from pathlib import Path

import nats
import pytest

from services.audit.app import AuditService, AuditSettings
from shared.audit.notes import SigningKey
from shared.audit.reader import unrecorded_events
from shared.audit.verifier import Report, StoredMessage
from shared.config import Config, parse_config
from shared.contracts import EventKind
from shared.contracts.audit import AuditEnvelope
from shared.embedded import NatsServer
from shared.mesh import bootstrap, write_key_pair
from shared.outcomes import Outcomes
from shared.subjects import Stream, Subjects
from tests.helpers import ServiceProcessHandle, eventually, verify_audit_log

pytestmark = [pytest.mark.chaos, pytest.mark.asyncio(loop_scope="module")]

ACK_WAIT_S = 2.0


def audit_config(prefix: str) -> Config:
    return parse_config({"prefix": prefix, "servers": {"demo": {"command": sys.executable,
                                                                 "args": ["-m", "services.demo_tools"]}},
                         "audit": {"checkpoint_every": 200, "checkpoint_interval_s": 0.5}}, source="<audit chaos>")


async def emit_events(url: str, prefix: str, count: int, tag: str) -> None:
    """Publish `count` call events (each with its own call id) to EVENTS, as services would."""
    nc = await nats.connect(url)
    try:
        outcomes = Outcomes(nc, nc.jetstream(), Subjects(prefix), source=f"producer-{tag}")
        for start in range(0, count, 50):
            await asyncio.gather(*(outcomes.emit(EventKind.CALL_COMPLETED, call_id=f"{tag}-{i}", principal="p",
                                                 tool="demo__echo", pool="default")
                                   for i in range(start, min(count, start + 50))))
    finally:
        await nc.close()


async def drained(url: str, prefix: str) -> bool:
    """True when the audit consumer has nothing pending and nothing unacked."""
    nc = await nats.connect(url)
    try:
        return not await unrecorded_events(nc.jetstream(), "main")
    finally:
        await nc.close()


async def read_log(url: str, prefix: str, key: SigningKey) -> tuple[list[StoredMessage], Report]:
    return await verify_audit_log(url, prefix, key.verifier)


def recorded_sources(records: list[StoredMessage]) -> Counter[int]:
    """How many records name each EVENTS sequence as their source."""
    bodies = [AuditEnvelope.model_validate_json(r.data).body for r in records]
    return Counter(b.src_seq for b in bodies if b.src_seq is not None)


async def events_stored(url: str, prefix: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(Stream.EVENTS.value, subjects_filter=f"{prefix}.evt.>")
    finally:
        await nc.close()
    return sum((info.state.subjects or {}).values())


async def test_a_killed_writer_loses_nothing_and_no_event_is_recorded_twice(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """With a writer SIGKILLed mid-load and restarted, every event has exactly one record and the log verifies."""
    prefix = f"auditchaos{uuid.uuid4().hex[:6]}"
    await bootstrap(nats_server.url, audit_config(prefix))
    key = SigningKey.generate("toolbus-main")
    write_key_pair(key, tmp_path / "log.key")

    def writer(name: str) -> ServiceProcessHandle:
        return ServiceProcessHandle("services.audit", nats_server.url, tmp_path / f"{name}.log", "--prefix", prefix,
                                    "--instance", name, "--signing-key", str(tmp_path / "log.key"),
                                    "--key-dir", str(tmp_path / "writers"), "--ack-wait-s", str(ACK_WAIT_S))

    a, b = writer("audit-a"), writer("audit-b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    load = asyncio.create_task(emit_events(nats_server.url, prefix, 3000, "first"))
    await eventually(lambda: _audit_size_at_least(nats_server.url, prefix, 800), timeout=60)
    a.kill()
    await load
    restarted = writer("audit-a")
    await restarted.wait_ready()
    await emit_events(nats_server.url, prefix, 500, "second")
    await eventually(lambda: drained(nats_server.url, prefix), timeout=90, interval=0.2)
    b.stop()
    restarted.stop()

    records, report = await read_log(nats_server.url, prefix, key)
    sources = recorded_sources(records)
    assert len(sources) == await events_stored(nats_server.url, prefix) == 3500 + 1  # + config.reloaded
    assert max(sources.values()) == 1, "an event was recorded twice"
    assert report.ok, [f.as_json() for f in report.findings]
    assert set(report.chains) == {"audit-a", "audit-b"}, "the restarted writer must resume its own chain"
    assert report.unsigned_count == 0, "a clean stop checkpoints what was replayed"


async def _audit_size_at_least(url: str, prefix: str, count: int) -> bool:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(Stream.AUDIT.value, subjects_filter=f"{prefix}.audit.>")
    finally:
        await nc.close()
    return sum((info.state.subjects or {}).values()) >= count


async def test_two_writers_on_one_chain_keep_it_linear(nats_server: NatsServer, tmp_path: Path) -> None:
    """Two writers sharing a key and chain id race on one chain; the chain never forks and each event is kept once."""
    prefix = f"auditdup{uuid.uuid4().hex[:6]}"
    await bootstrap(nats_server.url, audit_config(prefix))
    key = SigningKey.generate("toolbus-main")
    write_key_pair(key, tmp_path / "log.key")
    settings = AuditSettings(nats_server.url, tmp_path / "log.key", prefix, "twin", tmp_path / "writers",
                             ack_wait_s=ACK_WAIT_S)
    first, second = AuditService(settings), AuditService(settings)
    await first.start()
    await second.start()
    try:
        await emit_events(nats_server.url, prefix, 800, "dup")
        await eventually(lambda: drained(nats_server.url, prefix), timeout=60, interval=0.2)
    finally:
        await asyncio.gather(first.stop(), second.stop())
    records, report = await read_log(nats_server.url, prefix, key)
    sources = recorded_sources(records)
    assert len(sources) == 801 and max(sources.values()) == 1
    assert report.ok, [f.as_json() for f in report.findings]

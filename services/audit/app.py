"""Audit service: one record per bus event on this replica's chain, and signed checkpoints.

Wiring only: the EVENTS consumer, the chain writer (`chain.py`), the checkpointer
(`checkpointer.py`). What a record says about an event is in `records.py`; the record format,
hashing and the rules of a valid log are in `shared/audit/`, shared with the verifier.

An event is acked only once its record is stored, so a writer that dies loses nothing: the event
is redelivered (to this writer when it returns, or to another replica) and its `Nats-Msg-Id`
(`evt:<log>:<EVENTS sequence>`) makes the stream keep the first copy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter

from services.audit.chain import ChainIdentity, ChainWriter
from services.audit.checkpointer import Checkpointer, CheckpointPolicy
from services.audit.records import audit_event
from shared.audit.notes import SigningKey
from shared.bus import PullConsumer, PullSettings, connect, ensure_consumer, provision_streams
from shared.codec import unpack
from shared.config import Config
from shared.contracts import Event
from shared.contracts.audit import Activity, AuditActor, AuditEvent, AuditResource, Outcome
from shared.outcomes import now_ms
from shared.registry import Registry, RegistryWatch
from shared.service import BackgroundTasks
from shared.subjects import DEFAULT_PREFIX, Stream, Subjects, audit_durable

log = structlog.get_logger(__name__)

RECORDS = Counter("toolbus_audit_records_total", "Events recorded by this writer", ["outcome"])
STOP_TASKS_S = 5.0
MALFORMED_EVENT = "event.malformed"


@dataclass(frozen=True)
class AuditSettings:
    """Where the writer connects, its keys, and its clock (tests inject one)."""

    nats_url: str
    signing_key: Path  # the log key: certifies writer keys, signs checkpoints
    prefix: str = DEFAULT_PREFIX
    instance: str = "audit"
    key_dir: Path | None = None  # keeps this writer's key, so a restart continues its chain
    max_in_flight: int = 512
    ack_wait_s: float = 30.0  # an event a dead writer held is redelivered to another after this
    clock: Callable[[], int] = field(default=now_ms)


def load_writer_key(settings: AuditSettings) -> tuple[SigningKey, str]:
    """This writer's key and chain id: kept under `key_dir` (stable), or fresh for this process."""
    if settings.key_dir is None:
        return SigningKey.generate(settings.instance), f"{settings.instance}-{secrets.token_hex(3)}"
    path = settings.key_dir / f"{settings.instance}.key"
    if path.exists():
        return SigningKey.parse(path.read_text()), settings.instance
    key = SigningKey.generate(settings.instance)
    key.write(path)
    return key, settings.instance


class AuditService:
    """Consumes EVENTS and appends one signed, chained record per event; checkpoints the log."""

    name = "audit"

    def __init__(self, settings: AuditSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._config: Config | None = None
        self.writer: ChainWriter | None = None
        self.checkpointer: Checkpointer | None = None
        self._consumer: PullConsumer | None = None
        self._tasks = BackgroundTasks()
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Connect, open this writer's chain, start the checkpointer, then record events."""
        log_key = SigningKey.parse(self._settings.signing_key.read_text())
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        js = self._nc.jetstream()
        registry = await Registry.open(js, create=True)
        self._config = config = await registry.get_config()
        await provision_streams(js, self._subjects, replicas=config.nats.replicas)
        writer_key, chain_id = load_writer_key(self._settings)
        self.writer = ChainWriter(js, self._subjects, ChainIdentity(config.audit.log_id, chain_id, writer_key, log_key),
                                  self._settings.clock)
        await self.writer.open()
        self.checkpointer = Checkpointer(js, self._subjects, config.audit.log_id, log_key, policy=CheckpointPolicy(
            config.audit.checkpoint_every, config.audit.checkpoint_interval_s,
            Path(config.audit.witness_file) if config.audit.witness_file else None), clock=self._settings.clock)
        await self.checkpointer.start()
        await self._consume(config.audit.log_id)
        self._tasks.spawn(registry.watch(RegistryWatch(self._on_config)))
        self._ready = True

    async def _consume(self, log_id: str) -> None:
        assert self._nc is not None
        js = self._nc.jetstream()
        durable = audit_durable(log_id)
        await ensure_consumer(js, Stream.EVENTS, ConsumerConfig(
            durable_name=durable, filter_subject=self._subjects.stream_subjects(Stream.EVENTS)[0],
            deliver_policy=DeliverPolicy.ALL, ack_wait=self._settings.ack_wait_s,
            max_ack_pending=4 * self._settings.max_in_flight))
        settings = PullSettings(Stream.EVENTS, durable, max_in_flight=self._settings.max_in_flight)
        self._consumer = PullConsumer(self._nc, settings, self.record_event)
        await self._consumer.start()

    async def stop(self) -> None:
        """Stop taking events, finish the appends in flight, checkpoint, disconnect."""
        self._ready = False
        if self._consumer is not None:
            await self._consumer.stop(drain_timeout=STOP_TASKS_S)
        if self.checkpointer is not None:
            await self.checkpointer.stop()
        await self._tasks.stop(STOP_TASKS_S)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def record_event(self, msg: Msg) -> None:
        """Append the record of one EVENTS message, then ack it."""
        assert self.writer is not None
        src_seq = msg.metadata.sequence.stream
        audited = self._audit_view(msg.data)
        outcome = await self.writer.append(audited, msg_id=f"evt:{self.writer.identity.log_id}:{src_seq}",
                                           src_seq=src_seq)
        await msg.ack()
        RECORDS.labels(outcome.value).inc()

    def _audit_view(self, data: bytes) -> AuditEvent:
        """The event's audit view; an undecodable event is still recorded, as its size and digest."""
        try:
            return audit_event(unpack(Event, data), self._config)
        except Exception as error:  # noqa: BLE001 - a bad event must be recorded, never crash the writer
            log.warning("audit.malformed_event", error=type(error).__name__)
            return AuditEvent(
                activity_id=Activity.UNKNOWN, type_uid=6003 * 100, kind=MALFORMED_EVENT, action=MALFORMED_EVENT,
                actor=AuditActor(type="unknown", id="unknown"), resource=AuditResource(type="event"),
                outcome=Outcome.UNKNOWN, event_ts=self._settings.clock(), source="unknown",
                detail={"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
            )

    def _on_config(self, config: Config) -> None:
        self._config = config


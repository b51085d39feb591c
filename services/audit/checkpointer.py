"""Signed checkpoints: every N records or T seconds, the Merkle root of the whole log, signed.

The checkpointer replays the log in stream order with the same rules the verifier uses, so a
record that breaks them is reported the moment it lands (log line and metric) rather than at the
next audit. It still commits to every message in the tree: a checkpoint states what the stream
holds, and the verifier names the bad record. Several replicas may run one each; the
expected-sequence header on AUDIT_CP lets exactly one publish each checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client import Counter

from shared.audit.checkpoint import ChainHead, Checkpoint
from shared.audit.notes import NoteError, SigningKey
from shared.audit.replay import LogReplay
from shared.outcomes import EXPECTED_LAST_SUBJECT_SEQUENCE, WRONG_LAST_SEQUENCE
from shared.subjects import Header, Stream, Subjects

log = structlog.get_logger(__name__)

CHECKPOINTS = Counter("toolbus_audit_checkpoints_total", "Checkpoints this replica signed and published")
BAD_RECORDS = Counter("toolbus_audit_bad_records_total", "Records that break the log's rules", ["check"])


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to checkpoint and where else to write checkpoints."""

    every: int = 1000
    interval_s: float = 10.0
    witness_file: Path | None = None


class Checkpointer:
    """Replays one log and publishes signed checkpoints of it to AUDIT_CP."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, log_id: str, log_key: SigningKey, *,
                 policy: CheckpointPolicy, clock: Callable[[], int]) -> None:
        self._js = js
        self._subjects = subjects
        self._log_id = log_id
        self._key = log_key
        self._policy = policy
        self._clock = clock
        self.replay = LogReplay(subjects, log_id, log_key.verifier)
        self.last: Checkpoint | None = None
        self._last_cp_seq = 0
        self._lock = asyncio.Lock()
        self._sub: Subscription | None = None
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the newest checkpoint, replay the log from its start, checkpoint on schedule."""
        await self._load_last()
        self._sub = await self._js.subscribe(self._subjects.audit(self._log_id, "*"), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL, cb=self._on_record)
        self._timer = asyncio.create_task(self._tick(), name="audit-checkpoint-timer")

    async def stop(self) -> None:
        """Stop replaying; checkpoint what was replayed, so a clean stop leaves no unsigned tail."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.checkpoint()

    async def _on_record(self, msg: Msg) -> None:
        findings = len(self.replay.findings)
        self.replay.absorb(msg.metadata.sequence.stream, msg.subject, msg.data)
        for finding in self.replay.findings[findings:]:
            BAD_RECORDS.labels(finding.check.value).inc()
            log.error("audit.bad_record", check=finding.check.value, seq=finding.seq, chain_id=finding.chain_id,
                      reason=finding.message)
        if self.replay.tree.size - (self.last.size if self.last else 0) >= self._policy.every:
            await self.checkpoint()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._policy.interval_s)
            with contextlib.suppress(Exception):
                await self.checkpoint()

    async def checkpoint(self) -> Checkpoint | None:
        """Sign and publish a checkpoint of everything replayed, if it is newer than the newest one."""
        async with self._lock:
            size = self.replay.tree.size
            if size == 0 or (self.last is not None and size <= self.last.size):
                return None
            checkpoint = Checkpoint(self._log_id, size, self.replay.tree.root(), self.replay.last_seq,
                                    self._clock(), self._heads())
            note = checkpoint.sign(self._key)
            if not await self._publish(note, size):
                return None
            self.last = checkpoint
            self._witness(note)
            CHECKPOINTS.inc()
            log.info("audit.checkpointed", size=size, last_seq=checkpoint.last_seq)
            return checkpoint

    def _heads(self) -> tuple[ChainHead, ...]:
        return tuple(ChainHead(c.chain_id, c.next_seq - 1, c.head, str(c.key))
                     for c in self.replay.chains.values() if c.key is not None)

    async def _publish(self, note: str, size: int) -> bool:
        headers = {Header.MSG_ID: f"cp:{self._log_id}:{size}", EXPECTED_LAST_SUBJECT_SEQUENCE: str(self._last_cp_seq)}
        try:
            ack = await self._js.publish(self._subjects.audit_checkpoint(self._log_id), note.encode(), headers=headers)
        except BadRequestError as error:
            if error.err_code != WRONG_LAST_SEQUENCE:
                raise
            await self._load_last()  # another replica checkpointed first
            return False
        if ack.duplicate:
            await self._load_last()
            return False
        self._last_cp_seq = int(ack.seq)
        return True

    async def _load_last(self) -> None:
        try:
            msg = await self._js.get_last_msg(Stream.AUDIT_CP.value, self._subjects.audit_checkpoint(self._log_id))
        except NotFoundError:
            return
        self._last_cp_seq = int(msg.seq or 0)
        with contextlib.suppress(NoteError):
            self.last = Checkpoint.open((msg.data or b"").decode(), self._key.verifier)

    def _witness(self, note: str) -> None:
        """Append the checkpoint to the witness file: one JSON line per checkpoint."""
        if self._policy.witness_file is None:
            return
        try:
            with self._policy.witness_file.open("a", encoding="utf-8") as witness:
                witness.write(json.dumps({"log_id": self._log_id, "note": note}) + "\n")
        except OSError as error:
            log.warning("audit.witness_failed", path=str(self._policy.witness_file), error=str(error))

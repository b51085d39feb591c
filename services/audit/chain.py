"""One writer's hash chain on `toolbus.audit.<log_id>.<chain_id>`: append records, never fork.

Every append carries `Nats-Expected-Last-Subject-Sequence` (the stream sequence of this chain's
head) and a `Nats-Msg-Id` naming the source event. So:
- a second writer on the same chain, or a stale one, is refused by the stream: the refused
  writer moves to a fresh chain (it never appends after a record it did not write); at start a
  writer resumes its chain only if the newest record is signed with its own key;
- the same event appended by two writers (a redelivery after one died) is stored once: the
  stream answers the second with `duplicate`, and that writer's chain does not advance.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from shared.audit.entries import (
    GENESIS_PREV,
    RecordError,
    certify_writer,
    decode_record,
    encode_record,
    record_signed_by,
)
from shared.audit.notes import SigningKey
from shared.contracts.audit import (
    WRITER_STARTED,
    Activity,
    AuditActor,
    AuditBody,
    AuditEvent,
    AuditResource,
    Outcome,
)
from shared.outcomes import EXPECTED_LAST_SUBJECT_SEQUENCE, WRONG_LAST_SEQUENCE, publish_retrying
from shared.subjects import CONTENT_JSON, Header, Stream, Subjects

log = structlog.get_logger(__name__)



class Appended(StrEnum):
    """What became of one append."""

    STORED = "stored"  # the record is on this chain
    DUPLICATE = "duplicate"  # another writer already recorded the same source event


@dataclass(frozen=True)
class Head:
    """The newest record of the chain: its chain sequence, hash and stream sequence."""

    chain_seq: int = 0
    digest: bytes = bytes.fromhex(GENESIS_PREV)
    stream_seq: int = 0


@dataclass(frozen=True)
class ChainIdentity:
    """Which log and chain this writer appends to, and the keys it uses."""

    log_id: str
    chain_id: str
    writer_key: SigningKey  # signs every record
    log_key: SigningKey  # certifies the writer key in the chain's `audit.writer_started` record


class ChainWriter:
    """Appends records to one chain, one at a time."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, identity: ChainIdentity,
                 clock: Callable[[], int]) -> None:
        self._js = js
        self._subjects = subjects
        self.identity = identity
        self._clock = clock
        self._head = Head()
        self._lock = asyncio.Lock()

    @property
    def chain_id(self) -> str:
        return self.identity.chain_id

    @property
    def head(self) -> Head:
        return self._head

    async def open(self) -> None:
        """Resume the chain if its newest record is ours, else start afresh; then certify our key."""
        async with self._lock:
            await self._start_locked()

    async def append(self, event: AuditEvent, msg_id: str, src_seq: int | None = None) -> Appended:
        """Append one record for `event`; `msg_id` names its source so a second copy is dropped."""
        async with self._lock:
            try:
                return await self._append_locked(event, msg_id, src_seq)
            except ChainTakenError:
                # Another process writes here, even if with our key (a twin started with the same key
                # directory): resuming would make the two take turns forever, so move to a fresh chain.
                await self._start_locked(resume=False)
                return await self._append_locked(event, msg_id, src_seq)

    async def _start_locked(self, *, resume: bool = True) -> None:
        self._head = (await self._own_head() if resume else None) or await self._fresh_chain()
        key = str(self.identity.writer_key.verifier)
        cert = certify_writer(self.identity.log_key, self.identity.log_id, self.chain_id, key)
        event = AuditEvent(
            activity_id=Activity.CREATE, type_uid=6003 * 100 + Activity.CREATE, kind=WRITER_STARTED,
            action=WRITER_STARTED, actor=AuditActor(type="service", id=self.identity.writer_key.name),
            resource=AuditResource(type="writer_key", id=key), outcome=Outcome.SUCCESS,
            event_ts=self._clock(), source=self.identity.writer_key.name, detail={"cert": cert},
        )
        start_id = f"audit-start:{self.identity.log_id}:{self.chain_id}:{secrets.token_hex(8)}"
        await self._append_locked(event, start_id, None)
        log.info("audit.chain_opened", chain_id=self.chain_id, chain_seq=self._head.chain_seq)

    async def _append_locked(self, event: AuditEvent, msg_id: str, src_seq: int | None) -> Appended:
        head = self._head
        body = AuditBody(log_id=self.identity.log_id, chain_id=self.chain_id, chain_seq=head.chain_seq + 1,
                         prev=head.digest.hex(), ts=self._clock(), writer_id=self.identity.writer_key.name,
                         src_seq=src_seq, event=event)
        data, digest = encode_record(body.model_dump(mode="json"), self.identity.writer_key)
        stream_seq = await self._publish(data, msg_id, head)
        if stream_seq is None:
            return Appended.DUPLICATE
        self._head = Head(head.chain_seq + 1, digest, stream_seq)
        return Appended.STORED

    async def _publish(self, data: bytes, msg_id: str, head: Head) -> int | None:
        """The stream sequence the record landed at, or None when it duplicates another record."""
        subject = self._subjects.audit(self.identity.log_id, self.chain_id)
        headers = {Header.MSG_ID: msg_id, EXPECTED_LAST_SUBJECT_SEQUENCE: str(head.stream_seq),
                   Header.CONTENT_TYPE: CONTENT_JSON}
        try:
            ack = await publish_retrying(self._js, subject, data, headers)
        except BadRequestError as error:
            if error.err_code != WRONG_LAST_SEQUENCE:
                raise
            return await self._after_conflict(data)
        if not ack.duplicate:
            return int(ack.seq)
        stored = await self._js.get_msg(Stream.AUDIT.value, ack.seq)
        return int(ack.seq) if stored.subject == subject and stored.data == data else None

    async def _after_conflict(self, data: bytes) -> int:
        """The chain moved under us: our own earlier try landed (a lost ack), or someone else wrote."""
        stored = await self._last_stored()
        if stored is not None and stored[1] == data:
            return stored[0]
        log.error("audit.chain_conflict", chain_id=self.chain_id)
        raise ChainTakenError(f"chain {self.chain_id} was appended to by another writer")

    async def _last_stored(self) -> tuple[int, bytes] | None:
        subject = self._subjects.audit(self.identity.log_id, self.chain_id)
        try:
            msg = await self._js.get_last_msg(Stream.AUDIT.value, subject)
        except NotFoundError:
            return None
        return int(msg.seq or 0), msg.data or b""

    async def _own_head(self) -> Head | None:
        """The chain's newest record as our head, if this writer's key signed it."""
        stored = await self._last_stored()
        if stored is None:
            return None
        try:
            body, digest, signature = decode_record(stored[1])
        except RecordError:
            return None
        if not record_signed_by(self.identity.writer_key.verifier, digest, signature):
            return None
        return Head(int(body["chain_seq"]), digest, stored[0])

    async def _fresh_chain(self) -> Head:
        """Start a chain nobody has written to: this chain id if empty, else a new suffixed one."""
        while await self._last_stored() is not None:
            base = self.identity.chain_id
            self.identity = ChainIdentity(self.identity.log_id, f"{base}-{secrets.token_hex(3)}",
                                          self.identity.writer_key, self.identity.log_key)
        return Head()


class ChainTakenError(RuntimeError):
    """Another writer appended to this writer's chain; the writer has moved to a fresh chain."""


"""Replaying an audit log in stream order: leaves for the Merkle tree and the rules every chain obeys.

Both the checkpointer (before it signs) and the verifier (after the fact) replay the log with
this one class, so they cannot disagree about what a valid record is. A record is valid when
its bytes decode and hash to its stored hash, it sits on its own log's and chain's subject, it
follows its chain's previous record (sequence and `prev`), and it is signed by the chain's
writer key, which an `audit.writer_started` record certified with the log key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from shared.audit.entries import RecordError, decode_record, entry_hash, record_signed_by, writer_certified
from shared.audit.merkle import CompactTree, leaf_hash
from shared.audit.notes import NoteError, VerifierKey
from shared.contracts.audit import WRITER_STARTED, AuditBody
from shared.subjects import Subjects


class Check(StrEnum):
    """What a finding is about; each names the first stream sequence where it shows."""

    STREAM_CONFIG = "stream_config"  # AUDIT or AUDIT_CP lost deny_delete/deny_purge, allows rollup or expiry
    STREAM_GAP = "stream_gap"  # stream sequences are missing: messages were deleted
    MALFORMED = "malformed"  # not a record, or its bytes do not hash to its stored hash (modified)
    WRONG_SUBJECT = "wrong_subject"  # a record of another log or chain (copied)
    CERTIFICATE = "certificate"  # a writer key the log key did not certify for this chain
    SIGNATURE = "signature"  # not signed by the chain's writer key (injected or forged)
    GAP = "gap"  # the chain skips sequence numbers (deleted records)
    ORDER = "order"  # the chain repeats or goes back (reordered, replayed or inserted records)
    PREV = "prev"  # `prev` is not the hash of the chain's previous record
    TIMESTAMP = "timestamp"  # time goes back within a chain by more than the allowed skew
    CHECKPOINT_SIGNATURE = "checkpoint_signature"  # a checkpoint the log key did not sign
    CHECKPOINT_ROOT = "checkpoint_root"  # the log's Merkle root differs from a signed checkpoint
    CHECKPOINT_CHAIN = "checkpoint_chain"  # a chain head or writer key differs from a signed checkpoint
    TRUNCATED = "truncated"  # a signed checkpoint covers more records than the log has
    FORK = "fork"  # two signed checkpoints disagree, or the log differs from a trusted one
    ROLLBACK = "rollback"  # the log is behind a checkpoint verified before


@dataclass(frozen=True)
class Finding:
    """One failed check."""

    check: Check
    seq: int | None  # AUDIT stream sequence of the first bad record, when one can be named
    message: str
    chain_id: str | None = None
    checkpoint_seq: int | None = None  # AUDIT_CP stream sequence, for findings about a checkpoint

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check.value, "seq": self.seq, "chain_id": self.chain_id,
                "checkpoint_seq": self.checkpoint_seq, "message": self.message}


@dataclass
class ChainState:
    """What the replay knows of one chain so far."""

    chain_id: str
    next_seq: int = 1
    head: bytes = b"\x00" * 32
    head_stream_seq: int = 0
    key: VerifierKey | None = None
    last_ts: int = 0
    records: int = 0


def leaf_of(data: bytes) -> bytes:
    """The Merkle leaf of a stored message: its entry hash, or the hash of the raw bytes if it has none."""
    try:
        envelope = json.loads(data)
        if isinstance(envelope, dict) and isinstance(envelope.get("body"), dict):
            return entry_hash(envelope["body"])
    except (ValueError, RecordError):
        pass
    return leaf_hash(data)


@dataclass
class LogReplay:
    """Absorbs one log's messages in stream order; `findings` collects every rule they break."""

    subjects: Subjects
    log_id: str
    log_key: VerifierKey
    max_skew_ms: int = 5000
    tree: CompactTree = field(default_factory=CompactTree)
    chains: dict[str, ChainState] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    last_seq: int = 0  # stream sequence of the newest leaf
    valid_records: int = 0

    def absorb(self, seq: int, subject: str, data: bytes) -> AuditBody | None:
        """Add one message of this log as the next leaf; its body when it is a valid record."""
        self.tree.append(leaf_of(data))
        self.last_seq = seq
        chain_id = subject.rsplit(".", 1)[-1]
        try:
            body, digest, signature = decode_record(data)
            record = AuditBody.model_validate(body)
        except (RecordError, ValidationError) as error:
            self._find(Check.MALFORMED, seq, f"not a valid record: {str(error).splitlines()[0]}", chain_id)
            return None
        if record.log_id != self.log_id or record.chain_id != chain_id:
            self._find(Check.WRONG_SUBJECT, seq, f"a record of {record.log_id}/{record.chain_id} stored on "
                       f"{self.log_id}/{chain_id}", chain_id)
            return None
        chain = self.chains.setdefault(chain_id, ChainState(chain_id))
        ok = self._check_key(chain, record, digest, signature, seq) & self._check_link(chain, record, seq)
        chain.next_seq, chain.head, chain.head_stream_seq = record.chain_seq + 1, digest, seq
        chain.last_ts, chain.records = max(chain.last_ts, record.ts), chain.records + 1
        self.valid_records += ok
        return record if ok else None

    def _check_key(self, chain: ChainState, record: AuditBody, digest: bytes, signature: str, seq: int) -> bool:
        key = chain.key
        if record.event.kind == WRITER_STARTED:
            key = self._certified_key(record, seq)
            if key is None:
                return False
        if key is None:
            self._find(Check.SIGNATURE, seq, "no certified writer key on this chain", chain.chain_id)
            return False
        if not record_signed_by(key, digest, signature):
            self._find(Check.SIGNATURE, seq, f"not signed by writer key {key.name}", chain.chain_id)
            return False
        chain.key = key
        return True

    def _certified_key(self, record: AuditBody, seq: int) -> VerifierKey | None:
        text, cert = record.event.resource.id or "", record.event.detail.get("cert")
        try:
            key = VerifierKey.parse(text)
        except NoteError as error:
            self._find(Check.CERTIFICATE, seq, f"writer key unreadable: {error}", record.chain_id)
            return None
        if not isinstance(cert, str) or not writer_certified(self.log_key, self.log_id, record.chain_id, text, cert):
            self._find(Check.CERTIFICATE, seq, f"writer key {key.name} is not certified by the log key",
                       record.chain_id)
            return None
        return key

    def _check_link(self, chain: ChainState, record: AuditBody, seq: int) -> bool:
        ok = True
        if record.chain_seq > chain.next_seq:
            missing = record.chain_seq - chain.next_seq
            ok = self._find(Check.GAP, seq, f"chain seq {record.chain_seq} follows {chain.next_seq - 1}: "
                            f"{missing} record(s) missing", chain.chain_id)
        elif record.chain_seq < chain.next_seq:
            ok = self._find(Check.ORDER, seq, f"chain seq {record.chain_seq} after {chain.next_seq - 1}",
                            chain.chain_id)
        elif record.prev != chain.head.hex():
            ok = self._find(Check.PREV, seq, "prev is not the hash of the chain's previous record", chain.chain_id)
        if chain.records and record.ts < chain.last_ts - self.max_skew_ms:
            ok = self._find(Check.TIMESTAMP, seq, f"time goes back {chain.last_ts - record.ts} ms", chain.chain_id)
        return ok

    def _find(self, check: Check, seq: int | None, message: str, chain_id: str | None = None) -> bool:
        self.findings.append(Finding(check, seq, message, chain_id))
        return False

"""Audit logs as the stores hold them, and the ways an attacker rewrites them, for the tamper tests.

A `StoredLog` is one log's AUDIT messages and AUDIT_CP notes plus the keys behind them: the log
key (certifies writers, signs checkpoints) and each chain's writer key (the "insider" who can
re-sign records but holds no log key). `build_log` makes a synthetic one exactly as the writer and
the checkpointer would; the integration tests capture a real one. Every helper is pure: it takes
messages and returns new ones, so a scenario never disturbs the genuine log other tests use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.audit.checkpoint import ChainHead, Checkpoint
from shared.audit.entries import GENESIS_PREV, certify_writer, encode_record, entry_hash
from shared.audit.notes import SigningKey
from shared.audit.replay import Check, LogReplay, leaf_of
from shared.audit.verifier import Report, StoredMessage, StreamPolicy, VerifyOptions, verify_log
from shared.contracts.audit import WRITER_STARTED, Activity, AuditActor, AuditBody, AuditEvent, AuditResource, Outcome
from shared.subjects import Stream, Subjects

Body = dict[str, Any]
BodyEdit = Callable[[Body], None]
START_MS = 1_700_000_000_000


def append_only(name: str) -> StreamPolicy:
    """The policy of a stream provisioned as DESIGN.md §5 asks: deny delete and purge, no limits."""
    return StreamPolicy(name=name, deny_delete=True, deny_purge=True, allow_rollup=False, file_storage=True,
                        unlimited=True)


GOOD_POLICIES = (append_only(Stream.AUDIT.value), append_only(Stream.AUDIT_CP.value))


@dataclass(frozen=True)
class StoredLog:
    """One log's messages as stored, and every key that made them."""

    log_id: str
    subjects: Subjects
    log_key: SigningKey
    writer_keys: dict[str, SigningKey]  # chain id → the writer key that signs it
    records: tuple[StoredMessage, ...]
    checkpoints: tuple[StoredMessage, ...]
    policies: tuple[StreamPolicy, ...] = GOOD_POLICIES
    time_ms: int = field(default=START_MS)  # a `now` at which the newest checkpoint is fresh

    def options(self, **overrides: Any) -> VerifyOptions:
        """Verify options trusting this log's key, at a time its newest checkpoint is fresh."""
        return dataclasses.replace(VerifyOptions(self.log_key.verifier, self.log_id, self.subjects,
                                                 now_ms=self.time_ms), **overrides)

    def verify(self, records: Sequence[StoredMessage] | None = None,
               checkpoints: Sequence[StoredMessage] | None = None,
               policies: Sequence[StreamPolicy] | None = None, **overrides: Any) -> Report:
        """Verify these messages (the genuine ones where not given) as `toolbus audit verify` would."""
        return verify_log(self.records if records is None else records,
                          self.checkpoints if checkpoints is None else checkpoints,
                          self.policies if policies is None else policies, self.options(**overrides))

    def opened(self) -> list[Checkpoint]:
        """The genuine checkpoints, in AUDIT_CP order."""
        return [Checkpoint.open(m.data.decode(), self.log_key.verifier) for m in self.checkpoints]


# --- reading and re-encoding records ---------------------------------------------------------

def envelope_of(msg: StoredMessage) -> dict[str, Any]:
    value = json.loads(msg.data)
    assert isinstance(value, dict)
    return value


def body_of(msg: StoredMessage) -> Body:
    body = envelope_of(msg)["body"]
    assert isinstance(body, dict)
    return body


def chain_id_of(msg: StoredMessage) -> str:
    """The chain a message's subject names (its last token)."""
    return msg.subject.rsplit(".", 1)[-1]


def hash_of(msg: StoredMessage) -> str:
    return str(envelope_of(msg)["hash"])


def signed(body: Body, key: SigningKey) -> bytes:
    """The record bytes of `body`, hashed and signed by `key` (what a writer, or an insider, produces)."""
    return encode_record(body, key)[0]


def rehashed(body: Body, signature: str) -> bytes:
    """The record bytes of `body` with its hash recomputed but an old signature (no key needed)."""
    envelope = {"body": body, "hash": entry_hash(body).hex(), "sig": signature}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def with_data(msg: StoredMessage, data: bytes) -> StoredMessage:
    """The same message (seq, subject) with other bytes."""
    return StoredMessage(msg.seq, msg.subject, data)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """`data` with byte `index` XORed with `mask`."""
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


def renumbered(messages: Sequence[StoredMessage], first: int = 1) -> list[StoredMessage]:
    """The messages at consecutive stream sequences, as a stream recreated from them would store them."""
    return [StoredMessage(first + i, m.subject, m.data) for i, m in enumerate(messages)]


def set_path(path: str, value: Any) -> BodyEdit:
    """An edit setting one dotted field of a body, e.g. `event.actor.id`."""
    *parents, last = path.split(".")

    def edit(body: Body) -> None:
        target = body
        for name in parents:
            target = target[name]
        target[last] = value

    return edit


def rechained(records: Sequence[StoredMessage], index: int, writer_key: SigningKey,
              edit: BodyEdit) -> list[StoredMessage]:
    """`edit` record `index`, then re-link and re-sign it and every later record of its chain with the
    chain's writer key: every chain rule holds again; only a signed checkpoint can tell."""
    chain = records[index].subject
    out = list(records)
    prev: str | None = None
    for i in range(index, len(out)):
        if out[i].subject != chain:
            continue
        body = body_of(out[i])
        if prev is None:
            edit(body)
        else:
            body["prev"] = prev
        data = signed(body, writer_key)
        out[i] = with_data(out[i], data)
        prev = json.loads(data)["hash"]
    return out


def next_in_chain(records: Sequence[StoredMessage], index: int) -> int | None:
    """The index of the next record on the same subject as record `index`, if any."""
    return next((i for i in range(index + 1, len(records)) if records[i].subject == records[index].subject), None)


def last_in_chain(records: Sequence[StoredMessage], chain_subject: str) -> int:
    return max(i for i, m in enumerate(records) if m.subject == chain_subject)


# --- checkpoints -----------------------------------------------------------------------------

def checkpoints_at(log: StoredLog, records: Sequence[StoredMessage], sizes: Sequence[int],
                   time_ms: int) -> list[Checkpoint]:
    """The checkpoints the checkpointer would sign when its replay of `records` reaches each size, in order."""
    replay = LogReplay(log.subjects, log.log_id, log.log_key.verifier)
    taken: dict[int, Checkpoint] = {}

    def take() -> None:
        heads = tuple(ChainHead(c.chain_id, c.next_seq - 1, c.head, str(c.key))
                      for c in replay.chains.values() if c.key is not None)
        taken[replay.tree.size] = Checkpoint(log.log_id, replay.tree.size, replay.tree.root(), replay.last_seq,
                                             time_ms, heads)

    take()
    for msg in records[:max(sizes, default=0)]:
        replay.absorb(msg.seq, msg.subject, msg.data)
        if replay.tree.size in sizes:
            take()
    return [taken[size] for size in sizes]


def checkpoint_of(log: StoredLog, records: Sequence[StoredMessage], size: int, time_ms: int) -> Checkpoint:
    """The checkpoint the checkpointer would sign over the first `size` records (replayed with the same rules)."""
    return checkpoints_at(log, records, [size], time_ms)[0]


def note_message(seq: int, log: StoredLog, note: str) -> StoredMessage:
    return StoredMessage(seq, log.subjects.audit_checkpoint(log.log_id), note.encode())


def covering_start(checkpoints: Sequence[Checkpoint], index: int) -> int:
    """The first stream sequence after the newest checkpoint whose tree ends before leaf `index` (0-based), or 1:
    where a disagreeing checkpoint's range starts when leaf `index` is the first one changed."""
    before = [c for c in checkpoints if c.size <= index]
    return max((c.last_seq for c in before), default=0) + 1


def checkpoint_bound(log: StoredLog, records: Sequence[StoredMessage]) -> int | None:
    """The smallest sequence a checkpoint finding names once the genuine records became `records`.

    Checkpoints whose tree lies before the first changed leaf (or leaf sequence) still hold. Every later one
    inside the log disagrees, named from the first sequence after the newest one that holds; one beyond the
    log's end is a truncation, named after the log's new last sequence.
    """
    cps = log.opened()
    old = [(leaf_of(m.data), m.seq) for m in log.records]
    new = [(leaf_of(m.data), m.seq) for m in records]
    first = next((k for k, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
    bounds = [covering_start(cps, first)] if any(first < c.size <= len(new) for c in cps) else []
    if any(c.size > len(new) for c in cps):
        bounds.append((records[-1].seq if records else 0) + 1)
    return min(bounds, default=None)


def expected_first_bad(log: StoredLog, records: Sequence[StoredMessage], at: int) -> int:
    """`first_bad_seq` of a log whose genuine records became `records`, the first tampered one at `at`:
    the smaller of `at` and the checkpoint bound."""
    bound = checkpoint_bound(log, records)
    return at if bound is None else min(at, bound)


def resigned_note(note: str, key: SigningKey, **changes: Any) -> str:
    """The checkpoint of `note` with some fields changed, signed again by `key`."""
    checkpoint = Checkpoint.parse_text(note.rpartition("\n\n")[0] + "\n")
    return dataclasses.replace(checkpoint, **changes).sign(key)


def findings_of(report: Report, check: Check) -> list[int | None]:
    """The stream sequences of every finding of one kind."""
    return [f.seq for f in report.findings if f.check is check]


def describe(report: Report) -> list[dict[str, Any]]:
    """The findings, for assertion messages."""
    return [f.as_json() for f in report.findings]


# --- a synthetic log, built as the writer and the checkpointer build a real one --------------

def writer_started_event(log: str, chain: str, writer: SigningKey, log_key: SigningKey, ts: int) -> AuditEvent:
    """A chain's first event, as `ChainWriter` writes it: the writer's key, certified by `log_key`."""
    key = str(writer.verifier)
    return AuditEvent(activity_id=Activity.CREATE, type_uid=6003 * 100 + Activity.CREATE, kind=WRITER_STARTED,
                      action=WRITER_STARTED, actor=AuditActor(type="service", id=writer.name),
                      resource=AuditResource(type="writer_key", id=key), outcome=Outcome.SUCCESS, event_ts=ts,
                      source=writer.name, detail={"cert": certify_writer(log_key, log, chain, key)})


def call_event(n: int, ts: int, actor: str = "alice") -> AuditEvent:
    """The audit view of a completed call, as `services/audit/records.py` writes it."""
    return AuditEvent(activity_id=Activity.OTHER, type_uid=6003 * 100 + Activity.OTHER, kind="call.completed",
                      action="tools/call", actor=AuditActor(type="principal", id=actor, org="acme"),
                      resource=AuditResource(type="tool", id="demo__echo"), outcome=Outcome.SUCCESS, status="ok",
                      call_id=f"call-{n}", event_ts=ts, source="executor-default-1", arguments={"text": f"hi {n}"},
                      cost_micros=10_000, detail={"pool": "default", "attempt": 1})


@dataclass
class _Chain:
    chain_id: str
    key: SigningKey
    seq: int = 0
    head: str = GENESIS_PREV


def record_bytes(log_id: str, chain_id: str, chain_seq: int, prev: str, ts: int, key: SigningKey,
                 event: AuditEvent) -> bytes:
    """A record exactly as `ChainWriter` encodes one."""
    body = AuditBody(log_id=log_id, chain_id=chain_id, chain_seq=chain_seq, prev=prev, ts=ts,
                     writer_id=key.name, src_seq=None if event.kind == WRITER_STARTED else chain_seq, event=event)
    return signed(body.model_dump(mode="json"), key)


def build_log(order: Sequence[int], checkpoint_sizes: Sequence[int], log_key: SigningKey,
              writer_keys: Sequence[SigningKey], *, log_id: str = "main", prefix: str = "synth") -> StoredLog:
    """A log whose stream order follows `order` (chain indexes; each chain opens with its certified
    `audit.writer_started` record), checkpointed at `checkpoint_sizes`, in AUDIT_CP in that order."""
    subjects = Subjects(prefix)
    chains = [_Chain(f"audit-{chr(ord('a') + i)}", key) for i, key in enumerate(writer_keys)]
    records = []
    for n, chain_index in enumerate(order):
        chain, ts = chains[chain_index], START_MS + n
        event = writer_started_event(log_id, chain.chain_id, chain.key, log_key, ts) if chain.seq == 0 \
            else call_event(n, ts)
        data = record_bytes(log_id, chain.chain_id, chain.seq + 1, chain.head, ts, chain.key, event)
        chain.seq, chain.head = chain.seq + 1, json.loads(data)["hash"]
        records.append(StoredMessage(n + 1, subjects.audit(log_id, chain.chain_id), data))
    log = StoredLog(log_id, subjects, log_key, {c.chain_id: c.key for c in chains if c.seq}, tuple(records), ())
    time_ms = START_MS + len(records)
    notes = [note_message(i + 1, log, checkpoint.sign(log_key))
             for i, checkpoint in enumerate(checkpoints_at(log, records, checkpoint_sizes, time_ms))]
    return dataclasses.replace(log, checkpoints=tuple(notes), time_ms=time_ms)


def fixed_key(name: str) -> SigningKey:
    """A signing key derived from its name: the same bytes on every run, so hypothesis examples replay."""
    return SigningKey(name, Ed25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest()))



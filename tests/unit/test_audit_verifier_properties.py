"""Properties of `verify_log` on synthetic logs: a genuine log always verifies, one mutation never does.

A log here is two or three chains, each opened by a certified `audit.writer_started` record,
interleaved in a random stream order, with checkpoints signed by the log key at a few sizes
including the full one, built exactly as the writer and the checkpointer build a real one
(`tests/audit_logs.py`). Keys are derived from fixed seeds, so a failing example replays.

For each mutation the test asserts the strongest statement the verifier's contract allows:
the finding that names the mutated record at its exact sequence, and `first_bad_seq` exactly.
`first_bad_seq` is the smallest sequence any finding names; a changed Merkle leaf makes every
checkpoint covering it disagree, and that finding names the first sequence after the newest
checkpoint that still holds (`covering_start`), which is at or before the mutated record.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from shared.audit.entries import GENESIS_PREV, RecordError, decode_record
from shared.audit.replay import Check
from shared.audit.verifier import Report, StoredMessage
from tests.audit_logs import (
    StoredLog,
    body_of,
    build_log,
    call_event,
    chain_id_of,
    covering_start,
    describe,
    envelope_of,
    expected_first_bad,
    fixed_key,
    flip,
    hash_of,
    next_in_chain,
    note_message,
    rechained,
    record_bytes,
    rehashed,
    renumbered,
    resigned_note,
    set_path,
    signed,
    with_data,
)

pytestmark = [pytest.mark.unit]

LOG_KEY = fixed_key("toolbus-main")
WRITER_KEYS = [fixed_key(f"audit-{name}") for name in "abc"]
STRANGER = fixed_key("audit-stranger")  # a well-formed writer key the log key never certified
MUTATIONS = settings(max_examples=250, deadline=None)


@st.composite
def logs(draw: st.DrawFn, *, full: bool = True) -> StoredLog:
    """A random genuine log: 2 to 3 chains of 1 to 6 records in a random interleaving, a few checkpoints
    (always one of the full size when `full`)."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=3))
    order = draw(st.permutations([chain for chain, length in enumerate(lengths) for _ in range(length)]))
    size = len(order)
    sizes = set(draw(st.lists(st.integers(1, size - 1), max_size=3)))
    if full or draw(st.booleans()):
        sizes.add(size)
    return build_log(order, sorted(sizes), LOG_KEY, WRITER_KEYS[: len(lengths)])


@dataclass(frozen=True)
class Case:
    """A mutated log and what the verifier must say about it."""

    name: str
    records: Sequence[StoredMessage]
    checkpoints: Sequence[StoredMessage]
    named: frozenset[Check]  # some finding of one of these kinds ...
    at: int | None  # ... names this stream sequence (None: a finding about a checkpoint)
    first_bad: int | None
    remembered: str | None = None
    deleted: tuple[int, ...] = ()  # AUDIT sequences the server reports as deleted
    checkpoints_deleted: tuple[int, ...] = ()  # AUDIT_CP sequences the server reports as deleted
    only: bool = False  # no finding of another kind (every other rule still holds)


Mutation = Callable[[StoredLog, st.DataObject], Case]


def record_case(name: str, log: StoredLog, records: Sequence[StoredMessage], named: Check | frozenset[Check],
                at: int, deleted: tuple[int, ...] = ()) -> Case:
    """A mutation of the records: the finding at `at` names the first mutated record, and nothing before
    it or before the checkpoint bound is blamed."""
    return Case(name, records, log.checkpoints, named if isinstance(named, frozenset) else frozenset({named}), at,
                expected_first_bad(log, records, at), deleted=deleted)


def _index(log: StoredLog, data: st.DataObject, name: str = "index") -> int:
    return data.draw(st.integers(0, len(log.records) - 1), label=name)


def _replace(records: Sequence[StoredMessage], i: int, msg: StoredMessage) -> list[StoredMessage]:
    return [*records[:i], msg, *records[i + 1:]]


def byte_flip(log: StoredLog, data: st.DataObject) -> Case:
    """One bit of one record's bytes flipped: the record is malformed or its signature fails."""
    i = _index(log, data)
    original = log.records[i]
    position = data.draw(st.integers(0, len(original.data) - 1), label="position")
    mutated = with_data(original, flip(original.data, position, 1 << data.draw(st.integers(0, 7), label="bit")))
    records = _replace(log.records, i, mutated)
    if _same_record(original, mutated):
        return Case("neutral flip", records, log.checkpoints, frozenset(), None, None)
    return record_case("byte flip", log, records, frozenset({Check.MALFORMED, Check.SIGNATURE}), original.seq)


def _same_record(original: StoredMessage, mutated: StoredMessage) -> bool:
    """True when the flip changed only the spelling, not the record: the same body and the same signature
    bytes (base64 ignores the unused low bits of the signature's last character)."""
    try:
        body, _, signature = decode_record(mutated.data)
        same_signature = base64.b64decode(signature, validate=True) == base64.b64decode(envelope_of(original)["sig"])
    except (RecordError, binascii.Error, ValueError):
        return False
    return body == body_of(original) and same_signature


FIELD_EDITS = [("event.actor.id", "mallory"), ("event.outcome", "failure"), ("event.reason", "edited"),
               ("event.cost_micros", 0), ("event.call_id", "call-forged")]


def field_rehashed(log: StoredLog, data: st.DataObject) -> Case:
    """One field of one record changed and its hash recomputed; nobody could re-sign it."""
    i = _index(log, data)
    path, value = data.draw(st.sampled_from(FIELD_EDITS), label="edit")
    body = body_of(log.records[i])
    set_path(path, value)(body)
    records = _replace(log.records, i, with_data(log.records[i], rehashed(body, envelope_of(log.records[i])["sig"])))
    return record_case("field rehashed", log, records, Check.SIGNATURE, log.records[i].seq)


def dropped(log: StoredLog, data: st.DataObject) -> Case:
    """One record deleted with `delete_msg`: the others keep their sequences and the server lists the deleted one."""
    i = _index(log, data)
    seq = log.records[i].seq
    return record_case("dropped", log, [*log.records[:i], *log.records[i + 1:]], Check.STREAM_GAP, seq,
                       deleted=(seq,))


def dropped_unlisted(log: StoredLog, data: st.DataObject) -> Case:
    """One record left out of a stream recreated from the others (no deleted sequence to tell): the chain's
    next record skips a chain sequence (or has no certified key, when the writer_started record went)."""
    i = _index(log, data)
    records = renumbered([*log.records[:i], *log.records[i + 1:]])
    nxt = next_in_chain(log.records, i)
    if nxt is None:  # the chain's last record: only a checkpoint can tell
        return record_case("dropped last of chain, stream recreated", log, records, Check.TRUNCATED,
                           len(records) + 1)
    named = Check.SIGNATURE if body_of(log.records[i])["chain_seq"] == 1 else Check.GAP
    return record_case("dropped, stream recreated", log, records, named, records[nxt - 1].seq)


def duplicated(log: StoredLog, data: st.DataObject) -> Case:
    """A record stored twice in a row (a replayed publish), later ones moved up one sequence."""
    i = _index(log, data)
    records = renumbered([*log.records[: i + 1], log.records[i], *log.records[i + 1:]])
    return record_case("duplicated", log, records, Check.ORDER, records[i + 1].seq)


def replayed_at_end(log: StoredLog, data: st.DataObject) -> Case:
    """An old record published again after the newest one."""
    i = _index(log, data)
    seq = log.records[-1].seq + 1
    records = [*log.records, StoredMessage(seq, log.records[i].subject, log.records[i].data)]
    return record_case("replayed at end", log, records, Check.ORDER, seq)


def swapped(log: StoredLog, data: st.DataObject) -> Case:
    """Two records trade places (each keeps its subject and bytes, the stream sequences stay)."""
    i = data.draw(st.integers(0, len(log.records) - 2), label="first")
    j = data.draw(st.integers(i + 1, len(log.records) - 1), label="second")
    records = list(log.records)
    records[i], records[j] = (StoredMessage(records[i].seq, records[j].subject, records[j].data),
                              StoredMessage(records[j].seq, records[i].subject, records[i].data))
    # Two chains' records may trade places with no chain rule broken: the checkpoint's tree order catches it.
    start = covering_start(log.opened(), i)
    return record_case("swapped", log, records, Check.CHECKPOINT_ROOT, start)


def inserted(log: StoredLog, data: st.DataObject) -> Case:
    """A foreign record inserted at any position: signed by an uncertified key with a right `prev`, a record
    of another log, or a copy of another chain's record; later records move up one sequence."""
    p = data.draw(st.integers(0, len(log.records)), label="position")
    target = data.draw(st.sampled_from(sorted({m.subject for m in log.records})), label="chain")
    kind = data.draw(st.sampled_from(["uncertified", "other log", "other chain"]), label="kind")
    before = [m for m in log.records[:p] if m.subject == target]
    chain_id = target.rsplit(".", 1)[-1]
    if kind == "uncertified":
        prev = hash_of(before[-1]) if before else GENESIS_PREV
        foreign = record_bytes(log.log_id, chain_id, len(before) + 1, prev, log.time_ms, STRANGER,
                               call_event(999, log.time_ms))
    elif kind == "other log":
        foreign = record_bytes("staging", chain_id, len(before) + 1, GENESIS_PREV, log.time_ms,
                               log.writer_keys[chain_id], call_event(999, log.time_ms))
    else:
        foreign = data.draw(st.sampled_from([m for m in log.records if m.subject != target]), label="copied").data
    records = renumbered([*log.records[:p], StoredMessage(0, target, foreign), *log.records[p:]])
    named = Check.SIGNATURE if kind == "uncertified" else Check.WRONG_SUBJECT
    return record_case(f"inserted ({kind})", log, records, named, records[p].seq)


def rechained_by_insider(log: StoredLog, data: st.DataObject) -> Case:
    """A record and every later one of its chain rewritten, re-linked and re-signed with the chain's writer key:
    every chain rule holds, only the checkpoints disagree, from the first seq after the last one that holds."""
    i = _index(log, data)
    edit = set_path(*data.draw(st.sampled_from(FIELD_EDITS), label="edit"))
    records = rechained(log.records, i, log.writer_keys[chain_id_of(log.records[i])], edit)
    start = covering_start(log.opened(), i)
    return dataclasses.replace(record_case("rechained by insider", log, records, Check.CHECKPOINT_ROOT, start),
                               only=True)


def backdated_by_insider(log: StoredLog, data: st.DataObject) -> Case:
    """A record (not its chain's first) moved back in time beyond the allowed skew and re-signed by its writer."""
    later = [i for i, m in enumerate(log.records) if body_of(m)["chain_seq"] > 1]
    assume(later)
    i = data.draw(st.sampled_from(later), label="index")
    body = body_of(log.records[i])
    body["ts"] -= 10_000
    records = _replace(log.records, i, with_data(log.records[i], signed(body, log.writer_keys[
        chain_id_of(log.records[i])])))
    return record_case("backdated by insider", log, records, Check.TIMESTAMP, log.records[i].seq)


def truncated(log: StoredLog, data: st.DataObject) -> Case:
    """The newest records deleted, below the newest checkpoint."""
    keep = data.draw(st.integers(0, len(log.records) - 1), label="keep")
    seq = keep + 1
    return Case("truncated", log.records[:keep], log.checkpoints, frozenset({Check.TRUNCATED}), seq, seq)


def rolled_back(log: StoredLog, data: st.DataObject) -> Case:
    """Records and checkpoints cut back to an older checkpoint, against the newest one verified before."""
    cps = log.opened()
    k = data.draw(st.integers(-1, len(cps) - 2), label="back to checkpoint")
    size, last_seq = (cps[k].size, cps[k].last_seq) if k >= 0 else (0, 0)
    return Case("rolled back", log.records[:size], log.checkpoints[: k + 1], frozenset({Check.ROLLBACK}),
                last_seq + 1, last_seq + 1, remembered=log.checkpoints[-1].data.decode())


def _checkpoint_index(log: StoredLog, data: st.DataObject) -> int:
    return data.draw(st.integers(0, len(log.checkpoints) - 1), label="checkpoint")


def root_replaced(log: StoredLog, data: st.DataObject) -> Case:
    """A checkpoint's root line replaced, the signature left as it was."""
    c = _checkpoint_index(log, data)
    text, _, signature = log.checkpoints[c].data.decode().partition("\n\n")
    lines = text.split("\n")
    lines[2] = base64.b64encode(bytes(32)).decode()
    note = "\n".join(lines) + "\n\n" + signature
    checkpoints = [*log.checkpoints[:c], with_data(log.checkpoints[c], note.encode()), *log.checkpoints[c + 1:]]
    return Case("root replaced", log.records, checkpoints, frozenset({Check.CHECKPOINT_SIGNATURE}), None, None,
                only=True)


def root_resigned(log: StoredLog, data: st.DataObject) -> Case:
    """A checkpoint with another root signed by the log key (a key holder lying): the log disagrees from
    the first sequence after the checkpoint before it."""
    c = _checkpoint_index(log, data)
    note = resigned_note(log.checkpoints[c].data.decode(), LOG_KEY, root=bytes(32))
    checkpoints = [*log.checkpoints[:c], note_message(log.checkpoints[c].seq, log, note), *log.checkpoints[c + 1:]]
    start = log.opened()[c - 1].last_seq + 1 if c else 1
    return Case("root re-signed", log.records, checkpoints, frozenset({Check.CHECKPOINT_ROOT}), start, start,
                only=True)


def signature_dropped(log: StoredLog, data: st.DataObject) -> Case:
    """A checkpoint's signature line removed."""
    c = _checkpoint_index(log, data)
    text = log.checkpoints[c].data.decode().partition("\n\n")[0] + "\n\n"
    checkpoints = [*log.checkpoints[:c], with_data(log.checkpoints[c], text.encode()), *log.checkpoints[c + 1:]]
    return Case("signature dropped", log.records, checkpoints, frozenset({Check.CHECKPOINT_SIGNATURE}), None, None,
                only=True)


def checkpoint_deleted(log: StoredLog, data: st.DataObject) -> Case:
    """A checkpoint deleted from AUDIT_CP: the server lists its sequence; no record is blamed."""
    c = _checkpoint_index(log, data)
    checkpoints = [*log.checkpoints[:c], *log.checkpoints[c + 1:]]
    return Case("checkpoint deleted", log.records, checkpoints, frozenset({Check.STREAM_GAP}), None, None,
                checkpoints_deleted=(log.checkpoints[c].seq,), only=True)


ALL_MUTATIONS: list[Mutation] = [
    byte_flip, field_rehashed, dropped, dropped_unlisted, duplicated, replayed_at_end, swapped, inserted, truncated,
    rechained_by_insider, backdated_by_insider, rolled_back, root_replaced, root_resigned, signature_dropped,
    checkpoint_deleted,
]


def _named(report: Report, case: Case) -> bool:
    return any(f.check in case.named and f.seq == case.at for f in report.findings)


@settings(max_examples=60, deadline=None)
@given(log=logs(full=False))
def test_a_genuine_log_always_verifies(log: StoredLog) -> None:
    """An unmutated log verifies with no finding; only records after the newest checkpoint are unsigned."""
    report = log.verify()
    assert report.ok, describe(report)
    assert report.records == len(log.records)
    assert report.chains == dict(Counter(chain_id_of(m) for m in log.records))
    newest = max(log.opened(), key=lambda c: c.size, default=None)
    size, last_seq = (newest.size, newest.last_seq) if newest else (0, 0)
    assert report.unsigned_count == len(log.records) - size
    assert report.unsigned_from_seq == (last_seq + 1 if size < len(log.records) else None)


@settings(max_examples=40, deadline=None)
@given(log=logs())
def test_a_fully_checkpointed_log_has_no_unsigned_tail_and_no_warning(log: StoredLog) -> None:
    """A log whose newest checkpoint covers every record verifies with no unsigned tail and no warning."""
    report = log.verify()
    assert report.ok, describe(report)
    assert (report.unsigned_count, report.unsigned_from_seq, report.warnings) == (0, None, [])


@MUTATIONS
@given(log=logs(), mutation=st.sampled_from(ALL_MUTATIONS), data=st.data())
def test_one_mutation_is_always_rejected_and_named(log: StoredLog, mutation: Mutation, data: st.DataObject) -> None:
    """Any one mutation of what a log says is rejected, named at the mutated seq, with the exact first bad seq."""
    case = mutation(log, data)
    event(case.name)
    policies = [dataclasses.replace(log.policies[0], deleted=case.deleted),
                dataclasses.replace(log.policies[1], deleted=case.checkpoints_deleted)]
    report = log.verify(case.records, case.checkpoints, policies, remembered=case.remembered)
    if not case.named:  # a flip of an unused base64 bit: the stored record reads back unchanged
        assert report.ok, describe(report)
        return
    assert not report.ok, case.name
    assert _named(report, case), (case.name, case.at, describe(report))
    assert report.first_bad_seq == case.first_bad, (case.name, describe(report))
    if case.only:
        assert {f.check for f in report.findings} == case.named, (case.name, describe(report))


def test_a_signature_spelled_with_other_unused_base64_bits_is_the_same_signature() -> None:
    """A record whose signature's last base64 character differs only in bits base64 ignores still verifies:
    the verifier checks what a record says and who signed it, not how its bytes spell it."""
    log = build_log([0, 1, 0, 1], [4], LOG_KEY, WRITER_KEYS[:2])
    msg = log.records[2]
    envelope = envelope_of(msg)
    last = envelope["sig"].rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    respelled = alphabet[alphabet.index(last) ^ 0b1111]  # the 4 low bits of the 2nd char of a 1-byte group
    envelope["sig"] = envelope["sig"].rstrip("=")[:-1] + respelled + "=="
    data = json.dumps(envelope, separators=(",", ":")).encode()
    assert data != msg.data
    report = log.verify(_replace(log.records, 2, with_data(msg, data)))
    assert report.ok, describe(report)

"""The audit verifier detects modification, deletion, insertion, reordering and truncation of a real log,
and names the first bad sequence (DESIGN.md §8).

One genuine log per module: real calls through the in-process mesh, recorded by two audit writers
at once (two chains, interleaved in stream order), checkpointed every 25 records. Each test tampers
with a copy of it, as someone with access to the stores would ("rewriting the store"), and checks
the verifier's verdict; the last tests tamper through real stream operations on a test-only copy
of the AUDIT stream (`delete_msg`, `purge`, a plain publish), read back with the real reader.

How `first_bad_seq` is derived (never hard-coded): a record-level finding names the tampered
record itself; a changed Merkle leaf also makes every checkpoint covering it disagree, and that
finding names the first sequence after the newest checkpoint that still holds. `first_bad_seq`
is the smaller of the two (`expected_first_bad`), so it equals the tampered sequence exactly when
that record is the first after a checkpoint, and is the start of its checkpoint range otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from services.audit.app import AuditService, AuditSettings
from shared.audit.checkpoint import Checkpoint
from shared.audit.entries import GENESIS_PREV, certify_writer
from shared.audit.notes import SigningKey
from shared.audit.reader import log_subject, read_all, read_log, stream_policy, unrecorded_events
from shared.audit.replay import Check
from shared.audit.verifier import Report, StoredMessage, StreamPolicy
from shared.client import ToolbusClient
from shared.contracts.audit import WRITER_STARTED
from shared.embedded import NatsServer, RedisServer
from shared.mesh import write_key_pair
from shared.outcomes import now_ms
from shared.subjects import Stream, Subjects
from tests.audit_logs import (
    StoredLog,
    body_of,
    call_event,
    chain_id_of,
    checkpoint_of,
    covering_start,
    describe,
    envelope_of,
    expected_first_bad,
    findings_of,
    flip,
    hash_of,
    last_in_chain,
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
    writer_started_event,
)
from tests.conftest import ALICE_KEY, make_config
from tests.helpers import InProcessMesh, eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"tamper{uuid.uuid4().hex[:6]}"
LOG_ID = "main"
CALLS = 60
BATCH = 10
DAY_MS = 86_400_000


# --- the genuine log --------------------------------------------------------------------------------------

async def snapshot(js: JetStreamContext, subjects: Subjects) -> tuple[list[StoredMessage], list[StoredMessage],
                                                                      list[StreamPolicy]]:
    """The log's records, checkpoints and stream policies, as `toolbus audit verify` reads them."""
    log = await read_log(js, subjects, LOG_ID)
    return log.records, log.checkpoints, log.policies


async def settled_snapshot(js: JetStreamContext, key: SigningKey) -> tuple[list[StoredMessage],
                                                                          list[StoredMessage], list[StreamPolicy]]:
    """A snapshot taken once every event is recorded and the newest checkpoint covers every record."""
    subjects = Subjects(PREFIX)

    async def probe() -> tuple[list[StoredMessage], list[StoredMessage], list[StreamPolicy]] | None:
        if await unrecorded_events(js, LOG_ID):
            return None
        records, checkpoints, policies = await snapshot(js, subjects)
        newest = Checkpoint.open(checkpoints[-1].data.decode(), key.verifier) if checkpoints else None
        return (records, checkpoints, policies) if newest and newest.size == len(records) else None

    return await eventually(probe, timeout=30, interval=0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def genuine(nats_server: NatsServer, redis_server: RedisServer, git_repo: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> StoredLog:
    """A log of real calls written by two writers at once, and every key behind it."""
    key = SigningKey.generate("toolbus-main")
    key_path = tmp_path_factory.mktemp("audit") / "log.key"
    write_key_pair(key, key_path)
    config = make_config(git_repo, prefix=PREFIX, audit={"checkpoint_every": 25, "checkpoint_interval_s": 0.3})
    async with InProcessMesh(nats_server.url, config, redis_server.url, audit_key=key_path) as mesh:
        second = AuditService(AuditSettings(nats_server.url, key_path, prefix=PREFIX, instance="audit-second"))
        await second.start()
        try:
            async with ToolbusClient(nats_server.url, ALICE_KEY, prefix=PREFIX) as client:
                for start in range(0, CALLS, BATCH):
                    await asyncio.gather(*(client.call("demo__echo", {"text": f"hi {i}"}, timeout_s=30)
                                           for i in range(start, start + BATCH)))
            nc = await nats.connect(nats_server.url)
            try:
                records, checkpoints, policies = await settled_snapshot(nc.jetstream(), key)
            finally:
                await nc.close()
            assert mesh.audit is not None and mesh.audit.writer is not None and second.writer is not None
            writer_keys = {w.chain_id: w.identity.writer_key for w in (mesh.audit.writer, second.writer)}
        finally:
            await second.stop()
    return StoredLog(LOG_ID, Subjects(PREFIX), key, writer_keys, tuple(records), tuple(checkpoints), tuple(policies),
                     time_ms=now_ms())


# --- picking records by their place in the log --------------------------------------------------------------

def chain_subjects(log: StoredLog) -> list[str]:
    """The chains' subjects, in the order the chains start."""
    return list(dict.fromkeys(m.subject for m in log.records))


def is_call_record(msg: StoredMessage) -> bool:
    return bool(body_of(msg)["event"]["kind"] != WRITER_STARTED)


PLACES = ["mid-range", "after-checkpoint"]


def index_at(log: StoredLog, place: str) -> int:
    """The index of a call record in the log's second half that has a later record on its chain (first chain
    first): `mid-range` strictly inside a checkpoint's range, `after-checkpoint` the first record after one."""
    cps = log.opened()
    for subject in chain_subjects(log):
        for i in range(len(log.records) // 2, cps[-1].size):
            msg = log.records[i]
            if msg.subject != subject or not is_call_record(msg) or next_in_chain(log.records, i) is None:
                continue
            if (covering_start(cps, i) == msg.seq) == (place == "after-checkpoint"):
                return i
    raise AssertionError(f"the genuine log has no {place} record")


def successor(records: Sequence[StoredMessage], i: int) -> StoredMessage:
    """The next record on record `i`'s chain."""
    nxt = next_in_chain(records, i)
    assert nxt is not None
    return records[nxt]


def kinds(report: Report) -> set[Check]:
    return {f.check for f in report.findings}


def assert_rejected(report: Report, check: Check, seq: int | None, first_bad: int | None) -> None:
    """Not ok; a finding of `check` names `seq`; `first_bad_seq` is exactly `first_bad`."""
    assert not report.ok
    assert seq in findings_of(report, check), (check, seq, describe(report))
    assert report.first_bad_seq == first_bad, (first_bad, describe(report))


def replaced(records: Sequence[StoredMessage], i: int, msg: StoredMessage) -> list[StoredMessage]:
    return [*records[:i], msg, *records[i + 1:]]


# --- the genuine log ----------------------------------------------------------------------------------------

async def test_the_genuine_log_verifies_with_every_record_signed(genuine: StoredLog) -> None:
    """The log two writers produced from real calls verifies: two chains, several checkpoints, no unsigned tail."""
    report = genuine.verify()
    assert report.ok, describe(report)
    assert report.records == len(genuine.records) >= 3 * CALLS
    assert set(report.chains) == set(genuine.writer_keys) and len(report.chains) == 2
    assert min(report.chains.values()) >= 20, report.chains
    assert report.checkpoints >= 6
    assert (report.unsigned_count, report.unsigned_from_seq, report.warnings) == (0, None, [])


# --- modification -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("part", "check", "leaf_changes"), [
    ("body", Check.MALFORMED, True), ("hash", Check.MALFORMED, False), ("sig", Check.SIGNATURE, False)])
async def test_a_flipped_byte_is_named_at_its_record(genuine: StoredLog, place: str, part: str, check: Check,
                                                     leaf_changes: bool) -> None:
    """One flipped byte makes its record malformed (body, hash) or unsigned (sig), named at its own sequence."""
    i = index_at(genuine, place)
    msg = genuine.records[i]
    anchor = {"body": b'"prev":"', "hash": b'"hash":"', "sig": b'"sig":"'}[part]
    position = msg.data.index(anchor) + len(anchor) + 10
    records = replaced(genuine.records, i, with_data(msg, flip(msg.data, position)))
    report = genuine.verify(records)
    assert_rejected(report, check, msg.seq, expected_first_bad(genuine, records, msg.seq))
    if not leaf_changes:  # the Merkle leaf is the body's hash: every checkpoint still holds, the seq is exact
        assert report.first_bad_seq == msg.seq
        assert Check.CHECKPOINT_ROOT not in kinds(report)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("path", "value"), [("event.actor.id", "mallory"), ("event.outcome", "failure")])
async def test_a_rewritten_entry_with_its_hash_recomputed_fails_its_signature(
        genuine: StoredLog, place: str, path: str, value: str) -> None:
    """An entry whose actor or outcome is rewritten and rehashed fails its writer's signature at its own seq."""
    i = index_at(genuine, place)
    msg, nxt = genuine.records[i], successor(genuine.records, i)
    body = body_of(msg)
    set_path(path, value)(body)
    records = replaced(genuine.records, i, with_data(msg, rehashed(body, envelope_of(msg)["sig"])))
    report = genuine.verify(records)
    assert_rejected(report, Check.SIGNATURE, msg.seq, expected_first_bad(genuine, records, msg.seq))
    assert nxt.seq in findings_of(report, Check.PREV)
    assert findings_of(report, Check.CHECKPOINT_ROOT) and set(findings_of(report, Check.CHECKPOINT_ROOT)) == {
        covering_start(genuine.opened(), i)}


@pytest.mark.parametrize("place", PLACES)
async def test_a_rewritten_entry_resigned_by_its_writer_breaks_the_next_link(genuine: StoredLog, place: str) -> None:
    """An entry rewritten and re-signed with the insider writer key passes its signature; the chain's next
    record's `prev` and the checkpoints covering it name the change."""
    i = index_at(genuine, place)
    msg = genuine.records[i]
    nxt = successor(genuine.records, i)
    body = body_of(msg)
    set_path("event.actor.id", "mallory")(body)
    records = replaced(genuine.records, i, with_data(msg, signed(body, genuine.writer_keys[chain_id_of(msg)])))
    report = genuine.verify(records)
    start = covering_start(genuine.opened(), i)
    assert_rejected(report, Check.PREV, nxt.seq, min(start, nxt.seq))
    assert Check.SIGNATURE not in kinds(report)
    assert set(findings_of(report, Check.CHECKPOINT_ROOT)) == {start}


@pytest.mark.parametrize("place", PLACES)
async def test_a_rechained_rewrite_is_caught_only_by_the_checkpoints(genuine: StoredLog, place: str) -> None:
    """An entry and every later one of its chain rewritten, re-linked and re-signed by the insider obey every
    chain rule; only the signed checkpoints catch it, from the first seq after the last one that holds."""
    i = index_at(genuine, place)
    msg = genuine.records[i]
    records = rechained(genuine.records, i, genuine.writer_keys[chain_id_of(msg)],
                        set_path("event.outcome", "failure"))
    report = genuine.verify(records)
    cps = genuine.opened()
    start = covering_start(cps, i)
    first_disagreeing = next(c for c in cps if c.size > i)
    assert kinds(report) == {Check.CHECKPOINT_ROOT}, describe(report)
    assert_rejected(report, Check.CHECKPOINT_ROOT, start, start)
    assert start <= msg.seq <= first_disagreeing.last_seq  # the named range holds the rewritten record
    assert (start == msg.seq) == (place == "after-checkpoint")


# --- deletion and truncation --------------------------------------------------------------------------------

@pytest.mark.parametrize("place", PLACES)
async def test_a_deleted_record_is_a_stream_gap_and_a_chain_gap(genuine: StoredLog, place: str) -> None:
    """A record deleted from the stream is a stream gap at its seq (the server lists it) and a chain gap at
    its chain's next record; the checkpoints covering it disagree or are truncated."""
    i = index_at(genuine, place)
    msg = genuine.records[i]
    nxt = successor(genuine.records, i)
    records = [*genuine.records[:i], *genuine.records[i + 1:]]
    policies = [dataclasses.replace(genuine.policies[0], deleted=(msg.seq,)), genuine.policies[1]]
    report = genuine.verify(records, policies=policies)
    assert_rejected(report, Check.STREAM_GAP, msg.seq, expected_first_bad(genuine, records, msg.seq))
    assert nxt.seq in findings_of(report, Check.GAP)
    assert findings_of(report, Check.TRUNCATED) == [genuine.records[-1].seq + 1]


async def test_a_record_left_out_of_a_recreated_stream_is_a_chain_gap(genuine: StoredLog) -> None:
    """A record missing from a stream recreated without it (sequences renumbered, nothing listed as deleted)
    is still a chain gap at its chain's next record, and the checkpoints disagree from their range on."""
    i = index_at(genuine, "after-checkpoint")
    gap = successor(genuine.records, i).seq - 1  # renumbered: one less than before
    records = renumbered([*genuine.records[:i], *genuine.records[i + 1:]])
    report = genuine.verify(records)
    assert_rejected(report, Check.GAP, gap, expected_first_bad(genuine, records, gap))
    assert report.first_bad_seq == genuine.records[i].seq  # the first record after a checkpoint: exact
    assert Check.STREAM_GAP not in kinds(report)


async def test_a_tail_truncated_before_the_newest_checkpoint_is_reported(genuine: StoredLog) -> None:
    """The newest records deleted below the newest checkpoint are reported as truncated from the seq after
    the last one kept; older checkpoints still hold."""
    cps = genuine.opened()
    keep = cps[-1].size - 1  # not cps[-2].size + k: the last two checkpoints may be one record apart
    records = genuine.records[:keep]
    report = genuine.verify(records)
    first = records[-1].seq + 1
    assert_rejected(report, Check.TRUNCATED, first, first)
    assert kinds(report) == {Check.TRUNCATED}
    assert len(findings_of(report, Check.TRUNCATED)) == sum(c.size > keep for c in cps)


# --- reordering ---------------------------------------------------------------------------------------------

async def test_two_entries_of_one_chain_swapped_break_the_chain_order(genuine: StoredLog) -> None:
    """Two records of one chain trading places (stream seqs kept) are a chain gap at the first and out of
    order at the second."""
    i = index_at(genuine, "after-checkpoint")
    a, b = genuine.records[i], successor(genuine.records, i)
    j = genuine.records.index(b)
    records = replaced(replaced(genuine.records, i, StoredMessage(a.seq, b.subject, b.data)), j,
                       StoredMessage(b.seq, a.subject, a.data))
    report = genuine.verify(records)
    assert_rejected(report, Check.GAP, a.seq, expected_first_bad(genuine, records, a.seq))
    assert b.seq in findings_of(report, Check.ORDER)
    assert report.first_bad_seq == a.seq


async def test_two_entries_of_two_chains_swapped_are_caught_by_the_checkpoints(genuine: StoredLog) -> None:
    """Adjacent records of two chains trading places break no chain rule; the checkpoints' tree order does."""
    cps = genuine.opened()
    i = next(k for k in range(len(genuine.records) // 2, cps[-1].size - 1)
             if genuine.records[k].subject != genuine.records[k + 1].subject)
    a, b = genuine.records[i], genuine.records[i + 1]
    records = replaced(replaced(genuine.records, i, StoredMessage(a.seq, b.subject, b.data)), i + 1,
                       StoredMessage(b.seq, a.subject, a.data))
    report = genuine.verify(records)
    start = covering_start(cps, i)
    assert kinds(report) == {Check.CHECKPOINT_ROOT}, describe(report)
    assert_rejected(report, Check.CHECKPOINT_ROOT, start, start)
    assert start <= a.seq


# --- insertion ----------------------------------------------------------------------------------------------

def inserted_after(log: StoredLog, i: int, data: bytes, subject: str | None = None) -> list[StoredMessage]:
    """`data` stored right after record `i` on `subject` (its chain's by default), later records moved up."""
    new = StoredMessage(0, subject or log.records[i].subject, data)
    return renumbered([*log.records[: i + 1], new, *log.records[i + 1:]])


def forged_successor(log: StoredLog, i: int, key: SigningKey, prev: str) -> bytes:
    """A call record following record `i` on its chain (its chain seq + 1), with `prev` and signed by `key`."""
    body = body_of(log.records[i])
    body.update(chain_seq=body["chain_seq"] + 1, prev=prev)
    set_path("event.call_id", "call-injected")(body)
    return signed(body, key)


async def test_an_entry_inserted_with_a_wrong_prev_is_named(genuine: StoredLog) -> None:
    """A record signed by the chain's writer but whose `prev` is not its predecessor's hash is a PREV finding
    at its seq; the displaced record after it repeats a chain seq."""
    i = index_at(genuine, "after-checkpoint") - 1
    records = inserted_after(genuine, i, forged_successor(genuine, i, genuine.writer_keys[chain_id_of(
        genuine.records[i])], prev=GENESIS_PREV))
    seq = records[i + 1].seq
    report = genuine.verify(records)
    assert_rejected(report, Check.PREV, seq, expected_first_bad(genuine, records, seq))
    assert report.first_bad_seq == seq  # inserted right after a checkpoint: exact
    assert findings_of(report, Check.ORDER) == [successor(records, i + 1).seq]


async def test_an_entry_signed_by_an_uncertified_key_is_named(genuine: StoredLog) -> None:
    """A record with the right chain seq and `prev` but signed by a key the log key never certified is a
    SIGNATURE finding at its seq."""
    i = index_at(genuine, "mid-range")
    stranger = SigningKey.generate(genuine.writer_keys[chain_id_of(genuine.records[i])].name)
    records = inserted_after(genuine, i, forged_successor(genuine, i, stranger, prev=hash_of(genuine.records[i])))
    seq = records[i + 1].seq
    report = genuine.verify(records)
    assert_rejected(report, Check.SIGNATURE, seq, expected_first_bad(genuine, records, seq))
    assert report.first_bad_seq == covering_start(genuine.opened(), i + 1)
    assert report.first_bad_seq <= seq
    assert findings_of(report, Check.ORDER) == [successor(records, i + 1).seq]


def forged_chain(log: StoredLog, chain_id: str, count: int, first_seq: int) -> list[StoredMessage]:
    """A new chain started by someone who can publish to NATS but holds no key of the log: their own writer
    key with a "certificate" signed by a key of their own, then `count` records, from stream seq `first_seq`."""
    writer, fake_log_key = SigningKey.generate("audit-evil"), SigningKey.generate(log.log_key.name)
    subject, ts, prev = log.subjects.audit(log.log_id, chain_id), log.time_ms, GENESIS_PREV
    out = []
    for n in range(count + 1):
        event = writer_started_event(log.log_id, chain_id, writer, fake_log_key, ts) if n == 0 else call_event(n, ts)
        data = record_bytes(log.log_id, chain_id, n + 1, prev, ts, writer, event)
        out.append(StoredMessage(first_seq + n, subject, data))
        prev = hash_of(out[-1])
    return out


async def test_a_chain_started_with_a_forged_certificate_is_named(genuine: StoredLog) -> None:
    """Someone who can publish to NATS starts a chain with their own key and a forged certificate: a
    CERTIFICATE finding at its first record, and every later record of it is unsigned by a certified key."""
    seq = genuine.records[-1].seq + 1
    records = [*genuine.records, *forged_chain(genuine, "audit-evil", 3, seq)]
    report = genuine.verify(records)
    assert_rejected(report, Check.CERTIFICATE, seq, seq)
    assert findings_of(report, Check.SIGNATURE) == [seq + 1, seq + 2, seq + 3]
    assert report.unsigned_count == 4  # after the newest checkpoint: nothing else vouches for them


async def test_an_entry_copied_from_another_chain_is_on_the_wrong_subject(genuine: StoredLog) -> None:
    """A genuine record of one chain stored again on another chain's subject is a WRONG_SUBJECT finding."""
    first, second = chain_subjects(genuine)
    copy = genuine.records[last_in_chain(genuine.records, second)]
    seq = genuine.records[-1].seq + 1
    report = genuine.verify([*genuine.records, StoredMessage(seq, first, copy.data)])
    assert_rejected(report, Check.WRONG_SUBJECT, seq, seq)
    assert kinds(report) == {Check.WRONG_SUBJECT}


async def test_an_entry_copied_from_another_log_is_on_the_wrong_subject(genuine: StoredLog) -> None:
    """A record of another log, signed by the same writer key for the same chain id, is a WRONG_SUBJECT finding."""
    i = index_at(genuine, "mid-range")
    msg = genuine.records[i]
    body = body_of(msg)
    body["log_id"] = "staging"
    records = inserted_after(genuine, i, signed(body, genuine.writer_keys[chain_id_of(msg)]))
    seq = records[i + 1].seq
    report = genuine.verify(records)
    assert_rejected(report, Check.WRONG_SUBJECT, seq, expected_first_bad(genuine, records, seq))


# --- checkpoints --------------------------------------------------------------------------------------------

def extra_checkpoint(log: StoredLog, note: str) -> list[StoredMessage]:
    """The genuine checkpoints and one more note published after them."""
    return [*log.checkpoints, note_message(log.checkpoints[-1].seq + 1, log, note)]


def conflicting_note(log: StoredLog, kind: str) -> str:
    """A checkpoint signed by the log key that contradicts the log: of a size already checkpointed with
    another root (`same size`), or of a new size with a wrong root (`new size`)."""
    cps = log.opened()
    middle = cps[len(cps) // 2]
    if kind == "same size":
        return resigned_note(log.checkpoints[len(cps) // 2].data.decode(), log.log_key, root=bytes(32))
    sizes = {c.size for c in cps}
    size = next(n for n in range(middle.size + 1, len(log.records) + 1) if n not in sizes)  # a size no checkpoint has
    return dataclasses.replace(checkpoint_of(log, log.records, size, log.time_ms), root=bytes(32)).sign(log.log_key)


async def test_two_signed_checkpoints_of_one_size_are_a_fork(genuine: StoredLog) -> None:
    """A second checkpoint signed by the log key for an already checkpointed size, with another root, is a FORK
    (and disagrees with the log); the log itself has no bad record."""
    checkpoints = extra_checkpoint(genuine, conflicting_note(genuine, "same size"))
    report = genuine.verify(checkpoints=checkpoints)
    assert not report.ok
    assert [f.checkpoint_seq for f in report.findings if f.check is Check.FORK] == [checkpoints[-1].seq]
    assert kinds(report) == {Check.FORK, Check.CHECKPOINT_ROOT}
    assert {f.checkpoint_seq for f in report.findings} == {checkpoints[-1].seq}


async def test_a_signed_checkpoint_with_a_wrong_root_is_named(genuine: StoredLog) -> None:
    """A checkpoint signed by the log key whose root is not the log's is a CHECKPOINT_ROOT finding about it."""
    checkpoints = extra_checkpoint(genuine, conflicting_note(genuine, "new size"))
    report = genuine.verify(checkpoints=checkpoints)
    assert not report.ok
    assert kinds(report) == {Check.CHECKPOINT_ROOT}
    assert [f.checkpoint_seq for f in report.findings] == [checkpoints[-1].seq]


@pytest.mark.parametrize("kind", ["same size", "new size"])
async def test_a_conflicting_checkpoint_is_blamed_inside_its_own_tree(genuine: StoredLog, kind: str) -> None:
    """A conflicting checkpoint names the first seq after the largest smaller checkpoint that holds."""
    note = conflicting_note(genuine, kind)
    forged = Checkpoint.open(note, genuine.log_key.verifier)
    report = genuine.verify(checkpoints=extra_checkpoint(genuine, note))
    assert report.first_bad_seq == covering_start(genuine.opened(), forged.size - 1) <= forged.last_seq


async def test_a_log_rolled_back_to_an_older_checkpoint_is_caught_by_the_remembered_one(genuine: StoredLog) -> None:
    """Records and checkpoints cut back to an older checkpoint are self-consistent, but against the newest
    checkpoint verified before they are a ROLLBACK from the first seq after the older checkpoint."""
    cps = genuine.opened()
    k = len(cps) // 2
    records, checkpoints = genuine.records[: cps[k].size], genuine.checkpoints[: k + 1]
    newest = genuine.checkpoints[-1].data.decode()
    assert genuine.verify(records, checkpoints).ok  # nothing inside the cut log contradicts it
    for report in (genuine.verify(records, checkpoints, remembered=newest),
                   genuine.verify(records, checkpoints, trusted=newest)):
        assert_rejected(report, Check.ROLLBACK, cps[k].last_seq + 1, cps[k].last_seq + 1)


async def test_a_trusted_checkpoint_of_another_history_is_a_fork(genuine: StoredLog) -> None:
    """A trusted checkpoint (e.g. from a witness) over a different history of the same size is a FORK."""
    i = index_at(genuine, "mid-range")
    other = rechained(genuine.records, i, genuine.writer_keys[chain_id_of(genuine.records[i])],
                      set_path("event.outcome", "failure"))
    note = checkpoint_of(genuine, other, len(other), genuine.time_ms).sign(genuine.log_key)
    report = genuine.verify(trusted=note)
    assert not report.ok
    assert kinds(report) == {Check.FORK}, describe(report)


async def test_a_checkpoint_with_a_broken_signature_is_refused(genuine: StoredLog) -> None:
    """A checkpoint whose signature no longer verifies is a CHECKPOINT_SIGNATURE finding about it; the log's
    records are not blamed."""
    c = len(genuine.checkpoints) // 2
    note = genuine.checkpoints[c].data
    checkpoints = replaced(genuine.checkpoints, c, with_data(genuine.checkpoints[c], flip(note, len(note) - 20)))
    report = genuine.verify(checkpoints=checkpoints)
    assert not report.ok
    assert [(f.check, f.checkpoint_seq) for f in report.findings] == [(Check.CHECKPOINT_SIGNATURE,
                                                                        genuine.checkpoints[c].seq)]
    assert report.first_bad_seq is None


@pytest.mark.parametrize("signer", ["unknown key", "same name, other key"])
async def test_a_checkpoint_signed_by_an_unknown_key_is_refused(genuine: StoredLog, signer: str) -> None:
    """A checkpoint signed by a key other than the log key is a CHECKPOINT_SIGNATURE finding about it."""
    key = SigningKey.generate("stranger" if signer == "unknown key" else genuine.log_key.name)
    note = resigned_note(genuine.checkpoints[-1].data.decode(), key)
    checkpoints = extra_checkpoint(genuine, note)
    report = genuine.verify(checkpoints=checkpoints)
    assert [(f.check, f.checkpoint_seq) for f in report.findings] == [(Check.CHECKPOINT_SIGNATURE,
                                                                        checkpoints[-1].seq)]
    assert report.first_bad_seq is None


# --- a stream deleted and recreated with forged content -----------------------------------------------------

def reforged_without_keys(log: StoredLog) -> list[StoredMessage]:
    """Every record rewritten (the actor renamed) by someone with no key: each chain gets a writer key of
    theirs, "certified" by a key of theirs named like the log key; sequences renumbered from 1."""
    fake_log_key = SigningKey.generate(log.log_key.name)
    keys = {chain: SigningKey.generate(key.name) for chain, key in log.writer_keys.items()}
    heads: dict[str, str] = {}
    out = []
    for msg in log.records:
        chain, body = chain_id_of(msg), body_of(msg)
        body["prev"] = heads.get(chain, GENESIS_PREV)
        if is_call_record(msg):
            set_path("event.actor.id", "mallory")(body)
        else:
            writer = str(keys[chain].verifier)
            set_path("event.resource.id", writer)(body)
            set_path("event.detail", {"cert": certify_writer(fake_log_key, log.log_id, chain, writer)})(body)
        out.append(with_data(msg, signed(body, keys[chain])))
        heads[chain] = hash_of(out[-1])
    return renumbered(out)


def reforged_by_insiders(log: StoredLog) -> tuple[list[StoredMessage], int]:
    """Both chains rewritten from the log's second half on by their own writer keys (no log key): every chain
    rule holds; and the index of the first rewritten record."""
    first = [index_at(log, "mid-range")]
    records = rechained(log.records, first[0], log.writer_keys[chain_id_of(log.records[first[0]])],
                        set_path("event.outcome", "failure"))
    other = next(k for k in range(first[0], len(log.records))
                 if log.records[k].subject != log.records[first[0]].subject)
    first.append(other)
    records = rechained(records, other, log.writer_keys[chain_id_of(log.records[other])],
                        set_path("event.outcome", "failure"))
    return records, min(first)


async def test_a_stream_recreated_without_the_keys_fails_certificates_and_signatures(genuine: StoredLog) -> None:
    """A recreated stream whose records were all forged without any key is a CERTIFICATE finding from seq 1,
    with every other record unsigned by a certified key."""
    records = reforged_without_keys(genuine)
    report = genuine.verify(records)
    assert_rejected(report, Check.CERTIFICATE, 1, 1)
    starts = [m.seq for m in records if not is_call_record(m)]
    assert findings_of(report, Check.CERTIFICATE) == starts
    assert len(findings_of(report, Check.SIGNATURE)) == len(records) - len(starts)


async def test_a_stream_recreated_by_insiders_fails_the_old_checkpoints_or_the_remembered_one(
        genuine: StoredLog) -> None:
    """A stream recreated by holders of the writer keys (not the log key) obeys every chain rule: the old
    checkpoints disagree; with AUDIT_CP recreated too, the remembered checkpoint is a FORK (same size) or a
    ROLLBACK (shorter)."""
    records, first = reforged_by_insiders(genuine)
    report = genuine.verify(records)
    start = covering_start(genuine.opened(), first)
    assert kinds(report) == {Check.CHECKPOINT_ROOT}
    assert_rejected(report, Check.CHECKPOINT_ROOT, start, start)

    newest = genuine.checkpoints[-1].data.decode()
    alone = genuine.verify(records, checkpoints=[])
    assert alone.ok and "no signed checkpoint yet" in alone.warnings  # nothing left to contradict it
    assert kinds(genuine.verify(records, checkpoints=[], remembered=newest)) == {Check.FORK}
    shorter = records[:-5]
    report = genuine.verify(shorter, checkpoints=[], remembered=newest)
    assert_rejected(report, Check.ROLLBACK, shorter[-1].seq + 1, shorter[-1].seq + 1)


# --- what is not yet signed ---------------------------------------------------------------------------------

async def test_records_after_the_newest_checkpoint_are_reported_as_unsigned(genuine: StoredLog) -> None:
    """Records after the newest checkpoint are counted and warned about, not silently trusted; a stale newest
    checkpoint adds a warning."""
    cps = genuine.opened()
    k = len(cps) - 3
    checkpoints = genuine.checkpoints[: k + 1]
    report = genuine.verify(checkpoints=checkpoints, now_ms=cps[k].time_ms)
    assert report.ok, describe(report)
    assert report.unsigned_count == len(genuine.records) - cps[k].size
    assert report.unsigned_from_seq == cps[k].last_seq + 1
    assert [w for w in report.warnings if f"from seq {cps[k].last_seq + 1}" in w]
    assert not [w for w in report.warnings if "old" in w]
    stale = genuine.verify(checkpoints=checkpoints, now_ms=cps[k].time_ms + DAY_MS)
    assert [w for w in stale.warnings if "is the checkpointer running" in w], stale.warnings


async def test_an_insider_rewrite_after_the_newest_checkpoint_is_only_unsigned(genuine: StoredLog) -> None:
    """An insider's rechained rewrite after the newest checkpoint obeys every rule a writer key can satisfy:
    the verifier cannot tell, and reports the records from there as unsigned by the log key."""
    cps = genuine.opened()
    k = len(cps) - 3
    i = next(k2 for k2 in range(cps[k].size, len(genuine.records)) if is_call_record(genuine.records[k2]))
    records = rechained(genuine.records, i, genuine.writer_keys[chain_id_of(genuine.records[i])],
                        set_path("event.outcome", "failure"))
    report = genuine.verify(records, genuine.checkpoints[: k + 1])
    assert report.ok, describe(report)
    assert report.unsigned_from_seq is not None and report.unsigned_from_seq <= genuine.records[i].seq


async def test_two_chains_reordered_after_the_newest_checkpoint_are_only_unsigned(genuine: StoredLog) -> None:
    """Two adjacent records of two chains trading places after the newest checkpoint break no chain rule: the
    verifier cannot tell, and reports them as unsigned by the log key."""
    cps = genuine.opened()
    k = len(cps) - 3
    i = next(n for n in range(cps[k].size, len(genuine.records) - 1)
             if genuine.records[n].subject != genuine.records[n + 1].subject)
    a, b = genuine.records[i], genuine.records[i + 1]
    records = replaced(replaced(genuine.records, i, StoredMessage(a.seq, b.subject, b.data)), i + 1,
                       StoredMessage(b.seq, a.subject, a.data))
    report = genuine.verify(records, genuine.checkpoints[: k + 1])
    assert report.ok, describe(report)
    assert report.unsigned_from_seq is not None and report.unsigned_from_seq <= a.seq
    assert not genuine.verify(records).ok  # once a checkpoint covers them, the order is fixed


@pytest.mark.parametrize("stream", [0, 1])
@pytest.mark.parametrize(("field", "value"), [("deny_delete", False), ("deny_purge", False), ("allow_rollup", True),
                                              ("unlimited", False), ("file_storage", False)])
async def test_a_stream_that_allows_deleting_or_expiring_is_a_config_finding(
        genuine: StoredLog, stream: int, field: str, value: bool) -> None:
    """AUDIT or AUDIT_CP configured so records could be deleted, purged, rolled up or expired is a
    STREAM_CONFIG finding (about the stream, not a record)."""
    policies = list(genuine.policies)
    change: dict[str, Any] = {field: value}
    policies[stream] = dataclasses.replace(policies[stream], **change)
    report = genuine.verify(policies=policies)
    assert [(f.check, f.seq) for f in report.findings] == [(Check.STREAM_CONFIG, None)]


# --- tampering through real stream operations ---------------------------------------------------------------

@dataclass(frozen=True)
class _StreamName:
    """A stream name where `read_all` and `stream_policy` want a `Stream`: they only read its `.value`."""

    value: str


def as_stream(name: str) -> Stream:
    return cast(Stream, _StreamName(name))


@pytest_asyncio.fixture(loop_scope="module")
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


@dataclass(frozen=True)
class StreamCopy:
    """A test-only copy of AUDIT: the genuine records at the same seqs, on another prefix, deletes allowed."""

    name: str
    log: StoredLog  # the genuine log as the copy holds it (its subjects)

    async def read(self, js: JetStreamContext) -> tuple[list[StoredMessage], list[StreamPolicy]]:
        """The copy's records and policies as `toolbus audit verify` reads them; its policy stands for AUDIT's
        (the verifier ties deleted seqs to records by the stream's name)."""
        records = await read_all(js, as_stream(self.name), log_subject(self.log.subjects, LOG_ID))
        policy = await stream_policy(js, as_stream(self.name))
        return records, [dataclasses.replace(policy, name=Stream.AUDIT.value), self.log.policies[1]]


COPIES = itertools.count(1)


async def copy_of(js: JetStreamContext, genuine: StoredLog) -> StreamCopy:
    """Create `AUDIT_TAMPER_<n>` (deny_delete and deny_purge off) and republish the genuine records into it."""
    n = next(COPIES)
    name, subjects = f"AUDIT_TAMPER_{n}", Subjects(f"{PREFIX}copy{n}")
    await js.add_stream(StreamConfig(name=name, subjects=[f"{subjects.prefix}.audit.>"], storage=StorageType.FILE))
    records = []
    for msg in genuine.records:
        subject = subjects.audit(LOG_ID, chain_id_of(msg))
        ack = await js.publish(subject, msg.data, stream=name)
        assert ack.seq == msg.seq
        records.append(StoredMessage(msg.seq, subject, msg.data))
    return StreamCopy(name, dataclasses.replace(genuine, subjects=subjects, records=tuple(records)))


async def test_a_message_deleted_from_a_real_stream_is_a_stream_gap(js: JetStreamContext,
                                                                    genuine: StoredLog) -> None:
    """`delete_msg` of a middle record of a stream without deny_delete is a STREAM_GAP at its seq (and a
    STREAM_CONFIG finding for the missing deny flags)."""
    copy = await copy_of(js, genuine)
    i = index_at(genuine, "mid-range")
    seq = genuine.records[i].seq
    assert await js.delete_msg(copy.name, seq)
    records, policies = await copy.read(js)
    assert [m.seq for m in records] == [m.seq for m in genuine.records if m.seq != seq]
    report = copy.log.verify(records, policies=policies)
    assert_rejected(report, Check.STREAM_GAP, seq, expected_first_bad(copy.log, records, seq))
    assert (Check.STREAM_CONFIG, None) in [(f.check, f.seq) for f in report.findings]
    assert successor(genuine.records, i).seq in findings_of(report, Check.GAP)


async def test_a_chain_published_into_a_real_stream_with_a_forged_certificate_is_named(
        js: JetStreamContext, genuine: StoredLog) -> None:
    """A chain published by someone who can publish to the stream's subjects, with a forged certificate, is a
    CERTIFICATE finding at its first record."""
    copy = await copy_of(js, genuine)
    seq = genuine.records[-1].seq + 1
    for msg in forged_chain(copy.log, "audit-evil", 2, seq):
        assert (await js.publish(msg.subject, msg.data, stream=copy.name)).seq == msg.seq
    records, policies = await copy.read(js)
    report = copy.log.verify(records, policies=policies)
    assert_rejected(report, Check.CERTIFICATE, seq, seq)
    assert findings_of(report, Check.SIGNATURE) == [seq + 1, seq + 2]


async def test_a_record_republished_on_another_chain_of_a_real_stream_is_named(
        js: JetStreamContext, genuine: StoredLog) -> None:
    """A genuine record of one chain published again on another chain's subject is a WRONG_SUBJECT finding."""
    copy = await copy_of(js, genuine)
    first, second = chain_subjects(copy.log)
    seq = genuine.records[-1].seq + 1
    data = copy.log.records[last_in_chain(copy.log.records, second)].data
    assert (await js.publish(first, data, stream=copy.name)).seq == seq
    records, policies = await copy.read(js)
    report = copy.log.verify(records, policies=policies)
    assert_rejected(report, Check.WRONG_SUBJECT, seq, seq)


async def test_a_real_stream_cut_before_the_newest_checkpoint_is_truncated(js: JetStreamContext,
                                                                           genuine: StoredLog) -> None:
    """The newest messages deleted from a real stream, below the newest checkpoint, are reported from the seq
    after the last one kept."""
    copy = await copy_of(js, genuine)
    keep = genuine.opened()[-1].size - 1  # below the newest checkpoint, whatever the spacing of the last two
    for msg in genuine.records[keep:]:
        assert await js.delete_msg(copy.name, msg.seq)
    records, policies = await copy.read(js)
    report = copy.log.verify(records, policies=policies)
    first = genuine.records[keep - 1].seq + 1
    assert_rejected(report, Check.TRUNCATED, first, first)
    assert first in findings_of(report, Check.STREAM_GAP)  # the stream's last seq stays: the server lists them


async def test_a_real_stream_purged_from_its_start_is_a_stream_gap_at_seq_1(js: JetStreamContext,
                                                                            genuine: StoredLog) -> None:
    """A stream purged up to some seq starts later than 1: a STREAM_GAP at seq 1, and every checkpoint disagrees."""
    copy = await copy_of(js, genuine)
    assert await js.purge_stream(copy.name, seq=genuine.records[10].seq)
    records, policies = await copy.read(js)
    assert records[0].seq == genuine.records[10].seq
    report = copy.log.verify(records, policies=policies)
    assert_rejected(report, Check.STREAM_GAP, 1, 1)
    assert 1 in findings_of(report, Check.CHECKPOINT_ROOT)


async def test_the_real_audit_stream_refuses_delete_and_purge(js: JetStreamContext, genuine: StoredLog) -> None:
    """The provisioned AUDIT and AUDIT_CP streams refuse `delete_msg` and `purge` (deny_delete, deny_purge)."""
    for stream, seq in ((Stream.AUDIT, genuine.records[5].seq), (Stream.AUDIT_CP, genuine.checkpoints[0].seq)):
        with pytest.raises(APIError):
            await js.delete_msg(stream.value, seq)
        with pytest.raises(APIError):
            await js.purge_stream(stream.value)
    records, _, _ = await snapshot(js, genuine.subjects)
    assert records[: len(genuine.records)] == list(genuine.records)

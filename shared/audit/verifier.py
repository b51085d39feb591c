"""`toolbus audit verify`: replay the whole log and check it against its signed checkpoints.

Pure: messages in, a `Report` out (the CLI reads them from NATS, tests may hand them in).
Memory stays flat in the log's size: the tree is kept as its right border and the roots are
taken at the sizes some checkpoint names, as the replay passes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.audit.checkpoint import Checkpoint
from shared.audit.merkle import EMPTY_ROOT
from shared.audit.notes import NoteError, VerifierKey
from shared.audit.replay import Check, Finding, LogReplay
from shared.subjects import Stream, Subjects


class CannotVerify(Exception):
    """Verification could not run: exit code 2, not a verdict on the log."""


@dataclass(frozen=True)
class StoredMessage:
    """One message as the stream stores it."""

    seq: int
    subject: str
    data: bytes


@dataclass(frozen=True)
class StreamPolicy:
    """The parts of a stream's config that keep an audit log append-only."""

    name: str
    deny_delete: bool
    deny_purge: bool
    allow_rollup: bool
    file_storage: bool
    unlimited: bool  # no max_age, max_msgs, max_bytes or per-subject limit
    first_seq: int = 1
    deleted: tuple[int, ...] = ()  # sequences the server reports as deleted from inside the stream

    def problems(self) -> list[str]:
        wanted = {"deny_delete": self.deny_delete, "deny_purge": self.deny_purge, "no rollup": not self.allow_rollup,
                  "file storage": self.file_storage, "no limits": self.unlimited}
        return [name for name, ok in wanted.items() if not ok]


@dataclass(frozen=True)
class VerifyOptions:
    """What to trust and how strict to be."""

    log_key: VerifierKey
    log_id: str
    subjects: Subjects
    max_skew_ms: int = 5000
    stale_after_ms: int = 300_000
    now_ms: int = 0
    trusted: str | None = None  # a checkpoint note the caller trusts (e.g. from a witness)
    remembered: str | None = None  # the checkpoint note the last successful verify stored


@dataclass
class Report:
    """The verdict: ok, or findings naming the first bad sequence."""

    records: int = 0
    chains: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    newest: Checkpoint | None = None
    newest_note: str | None = None
    unsigned_from_seq: int | None = None
    unsigned_count: int = 0
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [f.seq for f in self.findings if f.seq is not None]
        return min(seqs) if seqs else None

    def as_json(self) -> dict[str, Any]:
        newest = self.newest
        return {
            "ok": self.ok, "first_bad_seq": self.first_bad_seq, "records": self.records, "chains": self.chains,
            "checkpoints": self.checkpoints,
            "newest_checkpoint": None if newest is None else {
                "size": newest.size, "last_seq": newest.last_seq, "time_ms": newest.time_ms},
            "unsigned_tail": {"from_seq": self.unsigned_from_seq, "count": self.unsigned_count},
            "findings": [f.as_json() for f in self.findings], "warnings": self.warnings,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records / self.elapsed_s) if self.elapsed_s > 0 else None,
        }


@dataclass
class _Signed:
    cp_seq: int | None
    checkpoint: Checkpoint
    note: str


def verify_log(
    records: Iterable[StoredMessage], checkpoints: Iterable[StoredMessage], streams: Iterable[StreamPolicy],
    options: VerifyOptions,
) -> Report:
    """Replay every record and every checkpoint of one log; see `Check` for what is checked."""
    started = time.perf_counter()
    report = Report()
    report.findings += _stream_findings(streams)
    signed = _open_checkpoints(checkpoints, options, report)
    anchors = [_open_anchor(note, options) for note in (options.trusted, options.remembered)]
    replay = LogReplay(options.subjects, options.log_id, options.log_key, options.max_skew_ms)
    passes = _Passes.of([s.checkpoint for s in signed] + [a for a in anchors if a])
    _replay_records(records, options, replay, passes, report)
    _check_checkpoints(signed, passes, replay, report)
    _check_anchors(anchors, passes, replay, report)
    _describe_tail(signed, passes, replay, options, report)
    report.findings = [*replay.findings, *report.findings]
    report.records = replay.tree.size
    report.chains = {c.chain_id: c.records for c in replay.chains.values()}
    report.elapsed_s = time.perf_counter() - started
    return report


def _stream_findings(streams: Iterable[StreamPolicy]) -> list[Finding]:
    findings = []
    for stream in streams:
        if problems := stream.problems():
            findings.append(Finding(Check.STREAM_CONFIG, None, f"stream {stream.name} lacks: {', '.join(problems)}"))
        if stream.first_seq > 1:
            findings.append(Finding(Check.STREAM_GAP, 1, f"stream {stream.name} starts at seq {stream.first_seq}"))
        if stream.deleted:
            seq = stream.deleted[0] if stream.name == Stream.AUDIT.value else None
            findings.append(Finding(Check.STREAM_GAP, seq, f"stream {stream.name}: {len(stream.deleted)} message(s) "
                                    f"deleted, first at seq {stream.deleted[0]}"))
    return findings


def _open_checkpoints(messages: Iterable[StoredMessage], options: VerifyOptions, report: Report) -> list[_Signed]:
    """Every checkpoint whose signature holds; the others become findings."""
    signed: list[_Signed] = []
    for msg in messages:
        note = msg.data.decode("utf-8", errors="replace")
        try:
            checkpoint = Checkpoint.open(note, options.log_key)
        except NoteError as error:
            report.findings.append(Finding(Check.CHECKPOINT_SIGNATURE, None, f"checkpoint refused: {error}",
                                           checkpoint_seq=msg.seq))
            continue
        if checkpoint.log_id != options.log_id:
            report.findings.append(Finding(Check.CHECKPOINT_SIGNATURE, None,
                                           f"checkpoint of log {checkpoint.log_id!r}", checkpoint_seq=msg.seq))
            continue
        signed.append(_Signed(msg.seq, checkpoint, note))
    report.checkpoints = len(signed)
    return signed


def _open_anchor(note: str | None, options: VerifyOptions) -> Checkpoint | None:
    if note is None:
        return None
    try:
        checkpoint = Checkpoint.open(note, options.log_key)
    except NoteError as error:
        raise CannotVerify(f"the trusted checkpoint does not verify with the log key: {error}") from error
    if checkpoint.log_id != options.log_id:
        raise CannotVerify(f"the trusted checkpoint is of log {checkpoint.log_id!r}, not {options.log_id!r}")
    return checkpoint


@dataclass
class _Passes:
    """Roots and chain heads captured while the replay passes the sizes checkpoints name."""

    sizes: set[int]
    heads: set[tuple[str, int]]
    roots: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # size → (root, last stream seq)
    seen_heads: dict[tuple[str, int], tuple[bytes, str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, checkpoints: list[Checkpoint]) -> _Passes:
        return cls({c.size for c in checkpoints}, {(h.chain_id, h.chain_seq) for c in checkpoints for h in c.chains},
                   {0: (EMPTY_ROOT, 0)})


def _replay_records(records: Iterable[StoredMessage], options: VerifyOptions, replay: LogReplay,
                    passes: _Passes, report: Report) -> None:
    log_prefix = options.subjects.audit(options.log_id, "")
    for msg in records:
        if not msg.subject.startswith(log_prefix):
            continue  # another log sharing the stream
        replay.absorb(msg.seq, msg.subject, msg.data)
        chain = replay.chains.get(msg.subject[len(log_prefix):])
        if chain is not None and (chain.chain_id, chain.next_seq - 1) in passes.heads:
            passes.seen_heads[(chain.chain_id, chain.next_seq - 1)] = (chain.head, str(chain.key), msg.seq)
        if replay.tree.size in passes.sizes:
            passes.roots[replay.tree.size] = (replay.tree.root(), msg.seq)


def _check_checkpoints(signed: list[_Signed], passes: _Passes, replay: LogReplay, report: Report) -> None:
    """Each signed checkpoint against the log, and against the checkpoints before it."""
    good_sizes, by_size = [0], dict[int, Checkpoint]()
    for s in signed:
        cp = s.checkpoint
        earlier = by_size.setdefault(cp.size, cp)
        if earlier.root != cp.root:
            report.findings.append(Finding(Check.FORK, None, f"two signed checkpoints of size {cp.size} differ",
                                           checkpoint_seq=s.cp_seq))
        if cp.size > replay.tree.size:
            report.findings.append(Finding(
                Check.TRUNCATED, replay.last_seq + 1, f"checkpoint covers {cp.size} records up to seq "
                f"{cp.last_seq}; the log has {replay.tree.size}, ending at seq {replay.last_seq}",
                checkpoint_seq=s.cp_seq))
            continue
        root, last_seq = passes.roots[cp.size]
        if root != cp.root or last_seq != cp.last_seq:
            first = passes.roots[max(g for g in good_sizes if g < cp.size)][1] + 1
            report.findings.append(Finding(Check.CHECKPOINT_ROOT, first, f"the log's first {cp.size} records "
                                           f"do not match the signed root; changed at or after seq {first}",
                                           checkpoint_seq=s.cp_seq))
            continue
        _check_heads(s, passes, report)
        good_sizes.append(cp.size)


def _check_heads(s: _Signed, passes: _Passes, report: Report) -> None:
    for head in s.checkpoint.chains:
        seen = passes.seen_heads.get((head.chain_id, head.chain_seq))
        if seen is None or seen[0] != head.head or seen[1] != head.writer_key:
            report.findings.append(Finding(
                Check.CHECKPOINT_CHAIN, seen[2] if seen else None, f"chain {head.chain_id} at seq "
                f"{head.chain_seq} differs from the signed head or writer key", head.chain_id, s.cp_seq))


def _check_anchors(anchors: list[Checkpoint | None], passes: _Passes, replay: LogReplay, report: Report) -> None:
    """The trusted and the remembered checkpoint: the log must have grown from them, not away."""
    for anchor, name in zip(anchors, ("trusted checkpoint", "checkpoint verified before"), strict=True):
        if anchor is None:
            continue
        if anchor.size > replay.tree.size:
            report.findings.append(Finding(Check.ROLLBACK, replay.last_seq + 1, f"the log has {replay.tree.size} "
                                           f"records; the {name} has {anchor.size}"))
        elif passes.roots[anchor.size][0] != anchor.root:
            report.findings.append(Finding(Check.FORK, None, f"the log's first {anchor.size} records differ "
                                           f"from the {name}"))


def _describe_tail(signed: list[_Signed], passes: _Passes, replay: LogReplay, options: VerifyOptions,
                   report: Report) -> None:
    """The newest checkpoint, and the records after it: reported as unsigned, never silently trusted."""
    if signed:
        newest = max(signed, key=lambda s: s.checkpoint.size)
        report.newest, report.newest_note = newest.checkpoint, newest.note
    size = report.newest.size if report.newest else 0
    report.unsigned_count = max(0, replay.tree.size - size)
    if report.unsigned_count:
        report.unsigned_from_seq = passes.roots.get(size, (b"", 0))[1] + 1
        report.warnings.append(f"{report.unsigned_count} record(s) from seq {report.unsigned_from_seq} are after "
                               "the newest checkpoint: chained and signed by writers, not yet by the log key")
    if report.newest is None and replay.tree.size:
        report.warnings.append("no signed checkpoint yet")
    elif report.newest is not None and options.now_ms - report.newest.time_ms > options.stale_after_ms \
            and report.unsigned_count:
        age_s = (options.now_ms - report.newest.time_ms) // 1000
        report.warnings.append(f"the newest checkpoint is {age_s} s old: is the checkpointer running?")

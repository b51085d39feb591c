"""`toolbus audit keygen|verify|prove|verify-proof`: keys, the whole-log verdict and offline proofs."""

from __future__ import annotations

import contextlib
import json
import time
from itertools import groupby
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from rich import box
from rich.markup import escape
from rich.table import Table

from shared.audit.checkpoint import Checkpoint
from shared.audit.notes import PRIVATE_PREFIX, NoteError, SigningKey, VerifierKey
from shared.audit.proofs import ProofError, build_bundle, verify_bundle
from shared.audit.reader import LogSnapshot, stream_messages
from shared.audit.reader import read_log as read_snapshot
from shared.audit.replay import leaf_of
from shared.audit.verifier import CannotVerify, Report, StoredMessage, VerifyOptions, verify_log
from shared.cli.audit.common import (
    EXIT_CANNOT,
    EXIT_FAILED,
    FINAL_KINDS,
    ConfigOption,
    JsonOption,
    Loaded,
    LogKeyOption,
    Record,
    Target,
    app,
    console,
    errors,
    iso,
    load_audit_config,
    run,
    target,
)
from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl
from shared.contracts.audit import InclusionBundle
from shared.mesh import audit_key_path, write_key_pair
from shared.subjects import Stream

# --- keys ------------------------------------------------------------------------------------------------


KEYGEN_HELP = (
    "Write a new log signing key (owner-only) and its .vkey; print the verifier key.\n\nBack the key up. "
    "Replacing the key of a log that has checkpoints makes them unverifiable with the new .vkey (keep the old "
    "one to verify them); a running audit service keeps its old key until restarted.")


@app.command("keygen", help=KEYGEN_HELP)
def keygen(name: Annotated[str | None, typer.Option("--name", help="Key name (default: toolbus-<log id>).")] = None,
           out: Annotated[Path | None, typer.Option("--out", help="Signing key file (default: audit.signing_key, "
                                                    "else <data-dir>/audit/log.key); the .vkey goes next to it.")]
           = None,
           force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
           config_path: ConfigOption = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Write a new log signing key (owner-only) and its .vkey; print the verifier key (help: KEYGEN_HELP)."""
    config = load_audit_config(config_path)
    path = out or audit_key_path(config, data_dir)
    existing = [p for p in (path, path.with_suffix(".vkey")) if p.exists()]
    if existing and not force:
        errors.print(f"[red]{escape(str(existing[0]))} exists: pass --force to replace it[/red]")
        raise typer.Exit(EXIT_FAILED)
    try:
        key = SigningKey.generate(name or f"toolbus-{config.audit.log_id}")
    except NoteError as error:
        raise typer.BadParameter(str(error), param_hint="'--name'") from None
    for old in existing:
        old.unlink()
    write_key_pair(key, path)
    errors.print(f"wrote the signing key to {escape(str(path))} (mode 0600) and its verifier key to "
                 f"{escape(str(path.with_suffix('.vkey')))}")
    print(key.verifier)


def read_log_key(given: str | None, key_path: Path) -> VerifierKey:
    """`--log-key` (a key, or a file holding one), else `<key path>.vkey`, else the signing key's; exit 2 if none."""
    candidates = [given] if given is not None else [str(key_path.with_suffix(".vkey")), str(key_path)]
    for candidate in candidates:
        try:
            text = _key_text(candidate, explicit=given is not None)
            if text is not None:
                text = text.strip()
                return SigningKey.parse(text).verifier if text.startswith(PRIVATE_PREFIX) else VerifierKey.parse(text)
        except (OSError, UnicodeDecodeError, NoteError) as error:
            cannot(f"cannot read the log key {candidate}: {error}")
    return cannot(f"no log key: pass --log-key (a verifier key or a file holding one); none at "
                  f"{key_path.with_suffix('.vkey')} or {key_path}")


def _key_text(candidate: str, *, explicit: bool) -> str | None:
    """The text of the file `candidate` names; an explicit value that names no file is the key itself."""
    is_file = False
    with contextlib.suppress(OSError):
        is_file = Path(candidate).is_file()
    if is_file:
        return Path(candidate).read_text(encoding="utf-8")
    return candidate if explicit else None


def cannot(message: str) -> NoReturn:
    """Say why verification cannot run, and exit 2."""
    errors.print(f"[red]cannot verify: {escape(message)}[/red]")
    raise typer.Exit(EXIT_CANNOT)


# --- verify --------------------------------------------------------------------------------------------


async def read_log(js: JetStreamContext, where: Target) -> tuple[LogSnapshot, float]:
    """The whole log for verification, and how long reading it took."""
    started = time.perf_counter()
    snapshot = await read_snapshot(js, where.subjects, where.log_id)
    return snapshot, time.perf_counter() - started


def read_trusted(path: Path, log_id: str) -> str:
    """A raw note, or the newest note of this log in a witness file (JSON lines `{"log_id", "note"}`)."""
    try:
        text = path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or not lines[-1].lstrip().startswith("{"):
            return text
        entries = [json.loads(line) for line in lines]
        mine = [e for e in entries if e.get("log_id") == log_id] or entries
        note = mine[-1]["note"]
        if not isinstance(note, str):
            raise TypeError("`note` is not a string")
        return note
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        cannot(f"cannot read the trusted checkpoint {path}: {error}")


def read_state(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        cannot(f"cannot read the state file {path}: {error}")


def store_state(path: Path, note: str, remembered: str | None) -> None:
    """Keep the newest verified checkpoint (never one older than the remembered one), atomically."""
    if remembered is not None and _size(remembered) >= _size(note):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(note, encoding="utf-8")
        temporary.replace(path)
    except OSError as error:
        cannot(f"the log verified, but the state file {path} cannot be written: {error}")


def _size(note: str) -> int:
    with contextlib.suppress(NoteError):
        return Checkpoint.parse_text(note.rpartition("\n\n")[0] + "\n").size
    return -1


VERIFY_HELP = (
    "Replay the whole log and check it against its signed checkpoints. Exit 0 ok, 1 tampering, 2 cannot verify."
    "\n\nExit 1, with findings naming the first bad sequence, for modified, deleted, injected, reordered or "
    "truncated records, and for a log key that signed none of the checkpoints (`checkpoint_signature` and "
    "`certificate` findings): a log re-signed by someone else looks exactly like that. Exit 2 when it cannot run: "
    "no log key, an unreadable --trusted or state file, a trusted or remembered checkpoint the key did not sign, "
    "NATS errors. On success the newest checkpoint is stored in the state file, so a later verify catches a log "
    "rolled back behind it.")


@app.command("verify", help=VERIFY_HELP)
def verify(trusted: Annotated[Path | None, typer.Option("--trusted", help="A checkpoint note you trust (e.g. from "
                                                        "a witness), or a witness JSONL file: the log must extend it.")]
           = None,
           log_key: LogKeyOption = None,
           state: Annotated[Path | None, typer.Option("--state", help="Where the newest verified checkpoint is kept "
                                                      "(default: <data-dir>/audit/verified-<log id>.note).")] = None,
           as_json: JsonOption = False, config_path: ConfigOption = None, nats_url: NatsUrl = None,
           data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Replay the whole log and check it against its signed checkpoints (help: VERIFY_HELP)."""
    where = target(config_path, nats_url, data_dir)
    key = read_log_key(log_key, where.key_path)
    state_path = state or data_dir / "audit" / f"verified-{where.log_id}.note"
    remembered = read_state(state_path)
    trusted_note = read_trusted(trusted, where.log_id) if trusted else None
    contents, read_s = run(where, lambda js: read_log(js, where), failure=EXIT_CANNOT)
    audit = where.config.audit
    options = VerifyOptions(
        log_key=key, log_id=where.log_id, subjects=where.subjects, max_skew_ms=int(audit.max_skew_s * 1000),
        stale_after_ms=int(audit.stale_after_s * 1000), now_ms=int(time.time() * 1000),
        trusted=trusted_note, remembered=remembered)
    try:
        result = verify_log(contents.records, contents.checkpoints, contents.policies, options)
    except CannotVerify as error:
        hint = f" (the checkpoint verified before is kept in {state_path})" if remembered is not None else ""
        cannot(f"{error}{hint}")
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print_verdict(result, where.log_id, key, read_s)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)
    if result.newest_note is not None:
        store_state(state_path, result.newest_note, remembered)


def print_verdict(result: Report, log_id: str, key: VerifierKey, read_s: float) -> None:
    verdict = "[green]OK[/green]" if result.ok else (f"[bold red]TAMPERED[/bold red]: {len(result.findings)} "
                                                     f"finding(s), first bad seq {result.first_bad_seq}")
    console.print(f"audit log {escape(log_id)} (key {escape(key.name)}): {verdict}")
    chains = ", ".join(f"{escape(c)} {n}" for c, n in sorted(result.chains.items())) or "none"
    console.print(f"{result.records} records on {len(result.chains)} chain(s) ({chains}); "
                  f"{result.checkpoints} signed checkpoint(s)" + (
                      f", newest of size {result.newest.size} up to seq {result.newest.last_seq} at "
                      f"{iso(result.newest.time_ms)}" if result.newest else ""))
    rate = f" ({result.records / result.elapsed_s:,.0f} records/s)" if result.elapsed_s > 0 else ""
    console.print(f"read in {read_s:.2f} s, verified in {result.elapsed_s:.2f} s{rate}")
    if result.unsigned_count:
        console.print(f"unsigned tail: {result.unsigned_count} record(s) from seq {result.unsigned_from_seq}")
    for warning in result.warnings:
        console.print(f"[yellow]warning: {escape(warning)}[/yellow]")
    if result.findings:
        console.print(findings_table(result))


def findings_table(result: Report) -> Table:
    """One row per kind of finding: how many, and the first (lowest seq) of them."""
    table = Table("check", "findings", "first seq", "first message", box=box.SIMPLE_HEAD,
                  caption="every finding: --json", caption_justify="left")
    for check, found in groupby(sorted(result.findings, key=lambda f: f.check.value), key=lambda f: f.check):
        listed = list(found)
        first = min(listed, key=lambda f: (f.seq is None, f.seq or 0))
        where = f" (chain {first.chain_id})" if first.chain_id else ""
        where += f" (checkpoint seq {first.checkpoint_seq})" if first.checkpoint_seq else ""
        table.add_row(check.value, str(len(listed)), _dash(first.seq), escape(first.message + where))
    return table


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


# --- proofs --------------------------------------------------------------------------------------------


class NotProvable(Exception):
    """No proof can be built: no such record, no checkpoint, or not checkpointed yet."""


async def prove_record(js: JetStreamContext, where: Target, wanted: str) -> InclusionBundle:
    """The inclusion bundle of record `wanted` (a stream seq, or a call id) in the newest checkpoint."""
    try:
        raw = await js.get_last_msg(Stream.AUDIT_CP.value, where.subjects.audit_checkpoint(where.log_id))
    except NotFoundError:
        raise NotProvable(f"log {where.log_id} has no checkpoint yet") from None
    note = (raw.data or b"").decode("utf-8", errors="replace")
    try:
        checkpoint = Checkpoint.parse_text(note.rpartition("\n\n")[0] + "\n")
    except NoteError as error:
        raise NotProvable(f"the newest checkpoint (AUDIT_CP seq {raw.seq}) is unreadable: {error}") from None
    leaves: list[bytes] = []
    candidates, index_of = Loaded(), dict[int, int]()
    async for msg in stream_messages(js, Stream.AUDIT, where.subject):
        if _may_be(msg, wanted):
            candidates.add(msg)
            index_of[msg.seq] = len(leaves)
        leaves.append(leaf_of(msg.data))
    record = choose(candidates.records, wanted)
    if index_of[record.seq] >= checkpoint.size:
        raise NotProvable(f"record seq {record.seq} is not yet checkpointed: the newest checkpoint covers "
                          f"{checkpoint.size} records up to seq {checkpoint.last_seq}; try again after the next one")
    try:
        return build_bundle(leaves, index_of[record.seq], record.data, record.seq, checkpoint_note=note,
                            checkpoint=checkpoint)
    except (ProofError, ValidationError) as error:
        raise NotProvable(f"cannot build the proof: {error}") from None


def _may_be(msg: StoredMessage, wanted: str) -> bool:
    return msg.seq == int(wanted) if wanted.isdigit() else wanted.encode() in msg.data


def choose(candidates: list[Record], wanted: str) -> Record:
    """The record of that seq; or of that call id, its final record (completed, rejected, ...) if it has one."""
    if wanted.isdigit():
        if not candidates:
            raise NotProvable(f"seq {wanted} is not a record of this log")
        return candidates[0]
    mine = [r for r in candidates if r.envelope.body.event.call_id == wanted]
    if not mine:
        raise NotProvable(f"no record of call {wanted}")
    return next((r for r in mine if r.envelope.body.event.kind in FINAL_KINDS), mine[0])


@app.command("prove")
def prove(wanted: Annotated[str, typer.Argument(metavar="CALL_ID_OR_SEQ", help="A call id (its final record is "
                                                "proven), or an AUDIT stream sequence.")],
          out: Annotated[Path | None, typer.Option("--out", help="Write the bundle here instead of stdout.")] = None,
          config_path: ConfigOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Write an offline inclusion proof of one record in the newest checkpoint (exit 1 if not checkpointed yet)."""
    where = target(config_path, nats_url, data_dir)
    try:
        bundle = run(where, lambda js: prove_record(js, where, wanted))
    except NotProvable as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(EXIT_FAILED) from None
    text = bundle.model_dump_json(indent=2)
    if out is None:
        print(text)
        return
    out.write_text(text + "\n", encoding="utf-8")
    body = bundle.record.body
    errors.print(f"wrote the proof of seq {bundle.stream_seq} ({escape(body.event.kind)}, {body.chain_id}:"
                 f"{body.chain_seq}) in the tree of size {bundle.tree_size} to {escape(str(out))}")


@app.command("verify-proof")
def verify_proof(path: Annotated[Path, typer.Argument(metavar="FILE", help="A bundle written by `prove`.")],
                 log_key: LogKeyOption = None, config_path: ConfigOption = None,
                 data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Check an inclusion proof offline (no NATS): exit 0 and what it proves, or 1 and the step that fails."""
    key_path = Path() if log_key else audit_key_path(load_audit_config(config_path), data_dir)
    key = read_log_key(log_key, key_path)  # given a key, not even the config is read
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        cannot(f"cannot read {path}: {error}")
    try:
        bundle = InclusionBundle.model_validate_json(text)
        checkpoint = verify_bundle(bundle, key)
    except (ValidationError, ProofError) as error:
        step = f"bundle: not an inclusion bundle: {str(error).splitlines()[0]}" \
            if isinstance(error, ValidationError) else str(error)
        errors.print(f"[red]the proof does not hold: {escape(step)}[/red]")
        raise typer.Exit(EXIT_FAILED) from None
    body = bundle.record.body
    console.print(f"[green]proven[/green]: {escape(body.event.kind)} of call {escape(body.event.call_id or '-')} "
                  f"(chain {escape(body.chain_id)}:{body.chain_seq}, AUDIT seq {bundle.stream_seq}) is leaf "
                  f"{bundle.index} of log {escape(checkpoint.log_id)}'s tree of size {checkpoint.size}, signed by "
                  f"{escape(key.name)} at {iso(checkpoint.time_ms)}", soft_wrap=True)

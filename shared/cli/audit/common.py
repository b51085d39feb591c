"""What every `toolbus audit` command shares: options, where the log is, records and how they print."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import nats.errors
import typer
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from shared.audit.reader import log_subject, stream_messages
from shared.audit.verifier import StoredMessage
from shared.cli.common import connect_once, resolve_bus
from shared.config import Config, ConfigError, load_config
from shared.contracts.audit import AuditEnvelope, Outcome
from shared.mesh import audit_key_path
from shared.subjects import Stream, Subjects

T = TypeVar("T")
app = typer.Typer(help="Read, report on, verify and prove the tamper-evident audit log.", no_args_is_help=True)
console = Console(emoji=False, highlight=False)
errors = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)

EXIT_FAILED = 1  # a finding (tampering), a proof that does not hold, nothing to prove, NATS unreachable
EXIT_CANNOT = 2  # verification could not run: no log key, unreadable trusted/state file, bad config, NATS errors
DEFAULT_CONFIG = Path("toolbus.yaml")
FINAL_KINDS = ("call.completed", "call.rejected", "call.failed", "call.dead_lettered")  # a call's last record
REJECTED, BUDGET_EXCEEDED, SETTLED = "call.rejected", "budget.exceeded", "budget.settled"
CSV_COLUMNS = ("seq", "ts", "chain_id", "chain_seq", "kind", "action", "actor", "org", "team", "project", "key_id",
               "resource_type", "resource_id", "outcome", "status", "reason", "call_id", "trace_id", "risk",
               "cost_micros", "hash")
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # spreadsheet formula triggers (CSV injection)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ExportFormat(StrEnum):
    """What `export` writes."""

    JSONL = "jsonl"  # one stored envelope per line, plus its stream `seq`
    CSV = "csv"  # flat columns, one row per record


ConfigOption = Annotated[Path | None, typer.Option("--config", help="toolbus.yaml giving audit.log_id, the skew "
                                                   "and staleness limits and the key path (default: ./toolbus.yaml "
                                                   "if it exists, else defaults).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ActorOption = Annotated[str | None, typer.Option("--actor", help="Only records of this actor id (principal name).")]
ToolOption = Annotated[str | None, typer.Option("--tool", help="Only records about this public tool.")]
OutcomeOption = Annotated[Outcome | None, typer.Option("--outcome", help="Only records with this outcome.")]
CallIdOption = Annotated[str | None, typer.Option("--call-id", help="Only records of this call.")]
KindOption = Annotated[str | None, typer.Option("--kind", help="Only records of this kind, e.g. call.rejected.")]
SinceOption = Annotated[str | None, typer.Option("--since", help="Records appended at or after this time: "
                                                 "ISO-8601 (UTC unless it says) or epoch ms.")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Records appended at or before this time.")]
LogKeyOption = Annotated[str | None, typer.Option("--log-key", help="The log's verifier key, or a file holding it "
                                                  "(default: <key path>.vkey, else derived from the key file).")]


# --- the log as records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One stored record: its AUDIT stream sequence, its bytes and their reading."""

    seq: int
    data: bytes
    envelope: AuditEnvelope

    @property
    def tool(self) -> str | None:
        resource = self.envelope.body.event.resource
        return resource.id if resource.type == "tool" else None

    def jsonl(self) -> str:
        """The envelope exactly as stored, with `"seq"` spliced in first (re-serialized only if it spans lines)."""
        text = self.data.decode()
        if text.startswith("{") and "\n" not in text and "\r" not in text:
            return f'{{"seq":{self.seq},' + text[1:]
        return json.dumps({"seq": self.seq, **json.loads(text)}, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Loaded:
    """Records read in stream order, and the sequences of messages that are not records."""

    records: list[Record] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)

    def add(self, msg: StoredMessage) -> Record | None:
        try:
            record = Record(msg.seq, msg.data, AuditEnvelope.model_validate_json(msg.data))
        except ValidationError:
            self.unreadable.append(msg.seq)
            return None
        self.records.append(record)
        return record

    def warn(self) -> None:
        if self.unreadable:
            errors.print(f"[yellow]{len(self.unreadable)} message(s) are not valid records and were skipped (first "
                         f"at seq {self.unreadable[0]}): run `toolbus audit verify`[/yellow]")


@dataclass(frozen=True)
class Filters:
    """Record body fields a command keeps; None matches anything."""

    actor: str | None = None
    tool: str | None = None
    outcome: Outcome | None = None
    call_id: str | None = None
    kind: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, record: Record) -> bool:
        body = record.envelope.body
        event = body.event
        wanted = ((self.actor, event.actor.id), (self.tool, record.tool), (self.outcome, event.outcome),
                  (self.call_id, event.call_id), (self.kind, event.kind))
        if any(want is not None and want != got for want, got in wanted):
            return False
        return (self.since_ms is None or body.ts >= self.since_ms) and (
            self.until_ms is None or body.ts <= self.until_ms)


def parse_time(text: str | None, option: str) -> int | None:
    """ISO-8601 (naive = UTC) or epoch milliseconds, as epoch milliseconds."""
    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither ISO-8601 (e.g. 2026-01-31T12:00:00Z) nor epoch milliseconds",
                                 param_hint=f"'{option}'") from None
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - EPOCH) // timedelta(milliseconds=1)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- where the log is ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The bus, the log and the key path one command works on."""

    url: str
    subjects: Subjects
    config: Config
    data_dir: Path

    @property
    def log_id(self) -> str:
        return self.config.audit.log_id

    @property
    def subject(self) -> str:
        return log_subject(self.subjects, self.log_id)

    @property
    def key_path(self) -> Path:
        return audit_key_path(self.config, self.data_dir)


def load_audit_config(path: Path | None) -> Config:
    """`--config`, else ./toolbus.yaml if it exists, else defaults; a bad file exits 2."""
    if path is None and not DEFAULT_CONFIG.exists():
        return Config()
    try:
        return load_config(path or DEFAULT_CONFIG)
    except ConfigError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(EXIT_CANNOT) from None


def target(config_path: Path | None, nats_url: str | None, data_dir: Path) -> Target:
    url, prefix = resolve_bus(nats_url, data_dir)
    return Target(url, Subjects(prefix), load_audit_config(config_path), data_dir)


def run(where: Target, action: Callable[[JetStreamContext], Awaitable[T]], failure: int = EXIT_FAILED) -> T:
    """Run one action against JetStream, then disconnect; NATS trouble exits `failure` with the reason."""

    async def connected() -> T:
        nc = await connect_once(where.url, name="toolbus-audit")
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    try:
        return asyncio.run(connected())
    except typer.Exit:
        raise typer.Exit(failure) from None  # connect_once said why
    except (nats.errors.Error, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        errors.print(f"[red]cannot read the audit log from {escape(where.url)}: {escape(reason)}[/red]")
        raise typer.Exit(failure) from None


async def load(js: JetStreamContext, where: Target, start_seq: int = 1) -> Loaded:
    """Every record of the log from `start_seq`."""
    loaded = Loaded()
    if start_seq > 1:
        try:
            await js.get_msg(Stream.AUDIT.value, seq=start_seq, subject=where.subject, next=True)
        except NotFoundError:
            return loaded  # nothing from there on: an ordered consumer would wait for the next append
    async for msg in stream_messages(js, Stream.AUDIT, where.subject, start_seq):
        loaded.add(msg)
    return loaded


async def load_last(js: JetStreamContext, where: Target, count: int) -> Loaded:
    """The newest `count` records, reading back from the end in growing windows."""
    last = (await js.stream_info(Stream.AUDIT.value)).state.last_seq
    window = count
    while True:
        start = max(1, last - window + 1)
        loaded = await load(js, where, start)
        if len(loaded.records) >= count or start == 1:
            loaded.records = loaded.records[-count:]
            return loaded
        window *= 4

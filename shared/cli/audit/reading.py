"""`toolbus audit tail|query|export`: the log's records, filtered, as tables, JSON, JSON lines or CSV."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, TextIO

import nats.errors
import typer
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich import box
from rich.markup import escape
from rich.table import Table

from shared.audit.verifier import StoredMessage
from shared.cli.audit.common import (
    CSV_COLUMNS,
    CSV_FORMULA_STARTS,
    ActorOption,
    CallIdOption,
    ConfigOption,
    ExportFormat,
    Filters,
    KindOption,
    Loaded,
    OutcomeOption,
    Record,
    SinceOption,
    Target,
    ToolOption,
    UntilOption,
    app,
    console,
    errors,
    iso,
    load,
    load_last,
    parse_time,
    run,
    target,
)
from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl
from shared.subjects import Stream

# --- tail, query, export -------------------------------------------------------------------------------


def cells(record: Record) -> list[str]:
    body = record.envelope.body
    event = body.event
    resource = f"{event.resource.type}:{event.resource.id}" if event.resource.id else event.resource.type
    return [str(record.seq), iso(body.ts), f"{body.chain_id}:{body.chain_seq}", event.kind, event.actor.id, resource,
            event.outcome.value, event.reason or "", event.call_id or ""]


def print_table(records: list[Record], title: str) -> None:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("seq", "time", "chain:seq", "kind", "actor", "resource", "outcome", "reason", "call id"):
        table.add_column(header, overflow="fold")  # a narrow terminal wraps ids, never cuts them short
    for record in records:
        table.add_row(*(escape(cell) for cell in cells(record)))
    console.print(table)


def print_records(records: list[Record], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps([{"seq": r.seq, **json.loads(r.data)} for r in records], indent=2, ensure_ascii=False))
    else:
        print_table(records, title)


@app.command("tail")
def tail(count: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many of the newest records.")] = 20,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records until Ctrl-C.")]
         = False,
         as_json: Annotated[bool, typer.Option("--json", help="One stored envelope (plus seq) per line.")] = False,
         config_path: ConfigOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Print the newest records: seq, time, chain:seq, kind, actor, resource, outcome, reason, call id."""
    where = target(config_path, nats_url, data_dir)

    async def action(js: JetStreamContext) -> None:
        loaded = await load_last(js, where, count)
        loaded.warn()
        if as_json:
            for record in loaded.records:
                print(record.jsonl(), flush=True)
        else:
            print_table(loaded.records, f"audit log {where.log_id}: newest {len(loaded.records)} records")
        if follow:
            last = loaded.records[-1].seq if loaded.records else None
            await follow_log(js, where, last or (await js.stream_info(Stream.AUDIT.value)).state.last_seq, as_json)

    with contextlib.suppress(KeyboardInterrupt):
        run(where, action)


async def follow_log(js: JetStreamContext, where: Target, after_seq: int, as_json: bool) -> None:
    """Print each record appended after `after_seq`, one line each, until cancelled."""
    sub = await js.subscribe(where.subject, stream=Stream.AUDIT.value, ordered_consumer=True, idle_heartbeat=1.0,
                             deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             config=ConsumerConfig(opt_start_seq=after_seq + 1))
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            record = Loaded().add(StoredMessage(msg.metadata.sequence.stream, msg.subject, msg.data))
            if record is None:
                errors.print(f"[yellow]seq {msg.metadata.sequence.stream} is not a valid record[/yellow]")
            elif as_json:
                print(record.jsonl(), flush=True)
            else:
                console.print(escape("  ".join(cell or "-" for cell in cells(record))), soft_wrap=True)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def filtered(where: Target, filters: Filters) -> list[Record]:
    """Every record of the log that matches, in stream order."""

    async def action(js: JetStreamContext) -> Loaded:
        return await load(js, where)

    loaded = run(where, action)
    loaded.warn()
    return [record for record in loaded.records if filters.matches(record)]


@app.command("query")
def query(actor: ActorOption = None, tool: ToolOption = None, outcome: OutcomeOption = None,
          call_id: CallIdOption = None, kind: KindOption = None, since: SinceOption = None, until: UntilOption = None,
          limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many: the newest ones.")]
          = None,
          as_json: Annotated[bool, typer.Option("--json", help="A JSON array of stored envelopes, each plus its "
                                                "seq.")] = False,
          config_path: ConfigOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Find records by actor, tool, outcome, call id, kind and time (tool = resource id of a `tool` resource)."""
    filters = Filters(actor, tool, outcome, call_id, kind, parse_time(since, "--since"), parse_time(until, "--until"))
    found = filtered(target(config_path, nats_url, data_dir), filters)
    shown = found[-limit:] if limit else found
    print_records(shown, as_json, f"{len(found)} matching records" + (f", newest {len(shown)} shown" if limit else ""))


@app.command("export")
def export(fmt: Annotated[ExportFormat, typer.Option("--format", help="jsonl: each envelope exactly as stored, plus "
                                                     "seq; csv: flat columns.")],
           out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
           actor: ActorOption = None, tool: ToolOption = None, outcome: OutcomeOption = None,
           call_id: CallIdOption = None, kind: KindOption = None, since: SinceOption = None, until: UntilOption = None,
           config_path: ConfigOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Export matching records as JSON lines or CSV (CSV cells starting with = + - @ get a leading ')."""
    filters = Filters(actor, tool, outcome, call_id, kind, parse_time(since, "--since"), parse_time(until, "--until"))
    found = filtered(target(config_path, nats_url, data_dir), filters)
    with (out.open("w", encoding="utf-8", newline="") if out else contextlib.nullcontext(sys.stdout)) as stream:
        if fmt is ExportFormat.JSONL:
            write_jsonl(found, stream)
        else:
            write_csv(found, stream)
    if out:
        errors.print(f"exported {len(found)} records to {escape(str(out))}")


def write_jsonl(records: Iterable[Record], stream: TextIO) -> None:
    for record in records:
        stream.write(record.jsonl() + "\n")


def write_csv(records: Iterable[Record], stream: TextIO) -> None:
    writer = csv.writer(stream)
    writer.writerow(CSV_COLUMNS)
    for record in records:
        writer.writerow([csv_cell(value) for value in csv_row(record)])


def csv_row(record: Record) -> list[object]:
    body = record.envelope.body
    event, actor = body.event, body.event.actor
    return [record.seq, iso(body.ts), body.chain_id, body.chain_seq, event.kind, event.action, actor.id, actor.org,
            actor.team, actor.project, actor.key_id, event.resource.type, event.resource.id, event.outcome.value,
            event.status, event.reason, event.call_id, event.trace_id, event.risk, event.cost_micros,
            record.envelope.hash]


def csv_cell(value: object) -> object:
    """'' for None; text a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_STARTS):
        return "'" + value
    return value

"""`toolbus dlq list|show|replay|purge`: inspect and replay dead-lettered calls.

A replay re-publishes the call's work item with a `Toolbus-Replay` header; the worker that
receives it resets the call (claim, attempt history, the stored `dead_lettered` result) and runs
it afresh under the same call id, so `fetch_result(call_id)` then returns the new result.
The DLQ entry is deleted once the replay is published. A replay drops the call's original
deadline (it has passed by now) and keeps its priority.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.table import Table

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, resolve_bus
from shared.codec import pack, unpack
from shared.contracts import DeadLetter
from shared.outcomes import now_ms
from shared.subjects import CONTENT_MSGPACK, Header, Stream, Subjects

T = TypeVar("T")
app = typer.Typer(help="Inspect, replay and purge dead-lettered calls.", no_args_is_help=True)
console = Console()
PoolOption = Annotated[str | None, typer.Option("--pool", help="Only this pool's dead letters.")]


@dataclass(frozen=True)
class Entry:
    """One stored dead letter and its stream sequence."""

    seq: int
    letter: DeadLetter


async def entries(js: JetStreamContext, subjects: Subjects, pool: str | None) -> AsyncIterator[Entry]:
    """Every dead letter in stream order (one direct lookup per entry)."""
    subject = subjects.dlq(pool or "*")
    seq = 1
    while True:
        try:
            raw = await js.get_msg(Stream.DLQ.value, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return
        assert raw.seq is not None
        yield Entry(raw.seq, unpack(DeadLetter, raw.data or b""))
        seq = raw.seq + 1


def _matches(entry: Entry, key: str) -> bool:
    return key in (str(entry.seq), entry.letter.work.call_id)


@app.command("list")
def list_entries(pool: PoolOption = None, as_json: Annotated[bool, typer.Option("--json")] = False,
                 nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List dead letters: sequence, call id, tool, attempts, last error."""
    found = _run(nats_url, data_dir, lambda js, s: _collect(js, s, pool))
    if as_json:
        print(json.dumps([{"seq": e.seq, **e.letter.model_dump(mode="json")} for e in found], indent=2))
        return
    table = Table("seq", "call id", "tool", "attempts", "last error", title=f"{len(found)} dead letters")
    for e in found:
        last = e.letter.attempts[-1].error if e.letter.attempts else ""
        table.add_row(str(e.seq), e.letter.work.call_id, e.letter.work.public_tool, str(len(e.letter.attempts)),
                      last[:60])
    console.print(table)


@app.command("show")
def show(key: Annotated[str, typer.Argument(help="Sequence or call id.")], nats_url: NatsUrl = None,
         data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Print one dead letter as JSON, with its whole attempt history."""
    found = [e for e in _run(nats_url, data_dir, lambda js, s: _collect(js, s, None)) if _matches(e, key)]
    if not found:
        console.print(f"[red]no dead letter {key!r}[/red]")
        raise typer.Exit(1)
    print(json.dumps({"seq": found[0].seq, **found[0].letter.model_dump(mode="json")}, indent=2))


@app.command("replay")
def replay(keys: Annotated[list[str] | None, typer.Argument(help="Sequences or call ids.")] = None,
           replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
           pool: PoolOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Run dead-lettered calls again under their own call ids, then drop them from the DLQ."""
    if not keys and not replay_all:
        raise typer.BadParameter("name sequences or call ids, or pass --all")
    replayed = _run(nats_url, data_dir, lambda js, s: _replay(js, s, pool, keys or [], replay_all))
    for entry in replayed:
        console.print(f"replayed {entry.letter.work.call_id} ({entry.letter.work.public_tool})")
    if not replayed:
        console.print("[red]nothing to replay[/red]")
        raise typer.Exit(1)


@app.command("purge")
def purge(pool: PoolOption = None, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
          nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Delete dead letters for good (all pools unless --pool)."""
    if not yes:
        typer.confirm(f"delete every dead letter{' of pool ' + pool if pool else ''}?", abort=True)
    count = _run(nats_url, data_dir, lambda js, s: _purge(js, s, pool))
    console.print(f"purged {count} dead letters")


async def _collect(js: JetStreamContext, subjects: Subjects, pool: str | None) -> list[Entry]:
    return [entry async for entry in entries(js, subjects, pool)]


async def _replay(js: JetStreamContext, subjects: Subjects, pool: str | None, keys: list[str],
                  replay_all: bool) -> list[Entry]:
    chosen = [e for e in await _collect(js, subjects, pool) if replay_all or any(_matches(e, k) for k in keys)]
    for entry in chosen:
        work = entry.letter.work
        replay_id = uuid.uuid4().hex
        headers: dict[str, str] = {Header.MSG_ID: f"replay-{work.call_id}-{replay_id}", Header.CALL_ID: work.call_id,
                   Header.REPLAY: replay_id, Header.CONTENT_TYPE: CONTENT_MSGPACK}
        # An operator replay runs afresh: no deadline, and no budget hold (the original was released when the
        # call was dead-lettered; a replay is an operator decision, not charged against the caller's budget).
        fresh = work.model_copy(update={"accepted_at_ms": now_ms(), "deadline_ms": None, "budget": None})
        await js.publish(subjects.work(work.pool, work.priority), pack(fresh), headers=headers)
        await js.delete_msg(Stream.DLQ.value, entry.seq)
    return chosen


async def _purge(js: JetStreamContext, subjects: Subjects, pool: str | None) -> int:
    count = len(await _collect(js, subjects, pool))
    await js.purge_stream(Stream.DLQ.value, subject=subjects.dlq(pool or "*"))
    return count


def _run(nats_url: str | None, data_dir: Path, action: Callable[[JetStreamContext, Subjects], Awaitable[T]]) -> T:
    """Run one async action against the mesh's JetStream, then disconnect."""
    url, prefix = resolve_bus(nats_url, data_dir)

    async def run() -> T:
        nc = await connect_once(url)
        try:
            return await action(nc.jetstream(), Subjects(prefix))
        finally:
            await nc.close()

    return asyncio.run(run())

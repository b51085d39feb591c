"""`toolbus ctx …`: context sessions from the shell (create, append, get, render, rescore, prune, dedupe,
export, import, delete, forget-user, search).

Every command is one request to the context store (`<prefix>.ctx.<verb>`) through `ContextClient`; the
store needs no API key. Exit codes: 0 done; 1 the store refused (`error: <message> (<reason>)` on stderr);
2 a usage error, or no mesh to ask (NATS unreachable, or no context store answering).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import nats.errors
import typer
from pydantic import BaseModel, ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, resolve_bus
from shared.context_client import ContextClient, ContextUnavailable
from shared.contracts.context import (
    BlockType,
    ChangeReply,
    NewBlock,
    RescoreMethod,
    Session,
    SessionMetrics,
    SessionPackage,
    SessionSummary,
)
from shared.errors import ContextRefused, first_problem
from shared.subjects import Subjects

T = TypeVar("T")
app = typer.Typer(help="Context sessions: create, append, render, hand off to another agent, forget.",
                  no_args_is_help=True)
console = Console(emoji=False, highlight=False)  # `k=v:x` metadata must not become emoji
errors = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)  # one line per message

EXIT_REFUSED = 1  # the store refused: unknown session, stale --if-version, too large, invalid request
EXIT_NO_MESH = 2  # NATS unreachable or no context store answered (typer's usage errors exit 2 too)
REQUEST_TIMEOUT_S = 10.0
PREVIEW_CHARS = 60
STDIN = "-"

SessionArg = Annotated[str, typer.Argument(help="The session id.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the store's reply as JSON.")]
MetaOption = Annotated[list[str] | None, typer.Option("--meta", help="key=value metadata (repeatable); "
                                                      "values are kept as strings.")]


# --- parsing -----------------------------------------------------------------------------------------


def parse_meta(pairs: list[str] | None) -> dict[str, str]:
    """`--meta k=v` options as a dict of strings (a session's metadata is strings only)."""
    metadata = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="'--meta'")
        metadata[key] = value
    return metadata


def check_share(value: float | None) -> float | None:
    """A fraction in (0, 1]: a render needs some room for the latest turns."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


def read_content(text: str | None, file: Path | None) -> str:
    """A block's content, exactly as given: TEXT, stdin for `-`, or the file of --file."""
    if (text is None) == (file is None):
        raise typer.BadParameter("give the content as TEXT, as - (read stdin) or with --file: exactly one")
    if file is not None:
        return _read_text(file.read_bytes, str(file))
    return _read_text(sys.stdin.buffer.read, "stdin") if text == STDIN else str(text)


def read_package(source: str) -> SessionPackage:
    """The session package in FILE, or on stdin for `-`, as `toolbus ctx export` wrote it."""
    if source == STDIN:
        raw = _read_text(sys.stdin.buffer.read, "stdin")
    else:
        try:
            raw = _read_text(Path(source).read_bytes, source)
        except OSError as error:
            raise typer.BadParameter(f"cannot read {source}: {error.strerror or error}", param_hint="FILE") from None
    try:
        return SessionPackage.model_validate_json(raw)
    except ValidationError as error:
        raise typer.BadParameter(f"{source} is not a session package: {first_problem(error, 'value')}",
                                 param_hint="FILE") from None


def _read_text(read: Callable[[], bytes], where: str) -> str:
    try:
        return read().decode("utf-8")
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{where} is not UTF-8 text") from None


# --- commands ----------------------------------------------------------------------------------------


@app.command("create")
def create(agent: Annotated[str, typer.Argument(help="The agent the session belongs to.")],
           user: Annotated[str | None, typer.Option("--user", help="The user it concerns (what `forget-user` "
                                                    "deletes by).")] = None,
           meta: MetaOption = None,
           max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Capacity in tokens "
                                                          "(default: the config's context.max_tokens).")] = None,
           system: Annotated[str | None, typer.Option("--system", help="A system prompt: the session's first "
                                                      "block, of type SYSTEM.")] = None,
           session_id: Annotated[str | None, typer.Option("--session-id", help="The new session's id "
                                                          "(default: a new UUIDv7).")] = None,
           as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Start a session of AGENT; print its id on stdout (and its version on stderr)."""
    metadata = parse_meta(meta)
    session = _run(nats_url, data_dir, lambda ctx: ctx.create(
        agent, session_id=session_id, user_id=user, metadata=metadata, max_tokens=max_tokens,
        blocks=[NewBlock(type=BlockType.SYSTEM, content=system)] if system is not None else []))
    if as_json:
        _print_json(session)
        return
    print(session.session_id)
    errors.print(f"created session {escape(session.session_id)} of agent {escape(agent)} at version "
                 f"{session.version}")


@app.command("append")
def append(session: SessionArg,
           block_type: Annotated[BlockType, typer.Option("--type", case_sensitive=False, help="The block's "
                                                         "kind.")],
           text: Annotated[str | None, typer.Argument(help="The block's content, or - to read it from stdin.")]
           = None,
           file: Annotated[Path | None, typer.Option("--file", exists=True, dir_okay=False, help="Read the "
                                                     "content from this file (as is).")] = None,
           relevance: Annotated[float, typer.Option("--relevance", min=0.0, max=1.0, help="0..1; renders and "
                                                    "prunes keep the most relevant blocks.")] = 1.0,
           meta: MetaOption = None,
           block_id: Annotated[str | None, typer.Option("--id", help="The block's id (default: a new one); "
                                                        "appending an id the session had is a no-op.")] = None,
           if_version: Annotated[int | None, typer.Option("--if-version", min=0, help="Only if the session is "
                                                          "still at this version (else exit 1, "
                                                          "version_conflict).")] = None,
           as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Append one block to SESSION: TEXT, stdin (-) or --file; print the new version."""
    content, metadata = read_content(text, file), parse_meta(meta)
    reply = _run(nats_url, data_dir, lambda ctx: ctx.append(session, [NewBlock(
        id=block_id, type=block_type, content=content, relevance=relevance, metadata=metadata)],
        if_version=if_version))
    if as_json:
        _print_json(reply)
        return
    for added in reply.block_ids:
        console.print(f"appended {escape(added)} to {escape(session)}: version {reply.version}, "
                      f"{_fullness(reply.metrics)}", soft_wrap=True)
    for skipped in reply.skipped:
        console.print(f"skipped {escape(skipped)}: the session already had a block with this id", soft_wrap=True)
    if reply.pruned:
        console.print(f"pruned {len(reply.pruned)} blocks to make room: {escape(', '.join(reply.pruned))}",
                      soft_wrap=True)


@app.command("get")
def get(session: SessionArg, as_json: JsonOption = False, nats_url: NatsUrl = None,
        data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show SESSION: who it belongs to, how full it is, and a table of its blocks."""
    found = _run(nats_url, data_dir, lambda ctx: ctx.get(session))
    if as_json:
        _print_json(found)
        return
    print_session(found)


@app.command("render")
def render(session: SessionArg,
           budget: Annotated[int, typer.Option("--budget", min=1, help="At most this many tokens.")],
           recent_share: Annotated[float | None, typer.Option("--recent-share", callback=check_share, help="Share "
                                                              "of the budget for the latest USER/AGENT turns "
                                                              "(default: context.recent_share).")] = None,
           min_relevance: Annotated[float | None, typer.Option("--min-relevance", min=0.0, max=1.0, help="Leave "
                                                               "out TOOL/MEMORY/KNOWLEDGE blocks below it "
                                                               "(default: context.min_relevance).")] = None,
           as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Render SESSION into at most --budget tokens: the text on stdout, exactly, and a summary on stderr."""
    reply = _run(nats_url, data_dir, lambda ctx: ctx.render(session, budget, recent_share=recent_share,
                                                            min_relevance=min_relevance))
    if as_json:
        _print_json(reply)
        return
    sys.stdout.write(reply.text)
    if sys.stdout.isatty() and reply.text and not reply.text.endswith("\n"):
        sys.stdout.write("\n")  # a terminal gets a tidy line end; a pipe or file gets the text's exact bytes
    sys.stdout.flush()
    errors.print(f"{reply.tokens} tokens of budget {reply.budget_tokens}, {len(reply.omitted)} blocks left out")


@app.command("rescore")
def rescore(session: SessionArg, query: Annotated[str, typer.Argument(help="What the agent works on now.")],
            method: Annotated[RescoreMethod, typer.Option("--method", case_sensitive=False, help="How blocks are "
                                                          "scored against QUERY.")] = RescoreMethod.BM25,
            if_version: Annotated[int | None, typer.Option("--if-version", min=0, help="Only if the session is "
                                                           "still at this version.")] = None,
            as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Set the relevance of every non-SYSTEM block of SESSION to its score against QUERY."""
    reply = _run(nats_url, data_dir, lambda ctx: ctx.rescore(session, query, method=method, if_version=if_version))
    _print_change(reply, as_json, f"rescored by {method.value}: {len(reply.changed)} blocks changed relevance")


@app.command("prune")
def prune(session: SessionArg,
          target: Annotated[float | None, typer.Option("--target", min=0.0, max=1.0, help="Saturation to prune "
                                                       "down to (default: context.prune_to).")] = None,
          as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Drop SESSION's least relevant non-SYSTEM blocks until it is no fuller than --target."""
    reply = _run(nats_url, data_dir, lambda ctx: ctx.prune(session, target))
    _print_change(reply, as_json, f"pruned {len(reply.removed)} blocks")


@app.command("dedupe")
def dedupe(session: SessionArg, as_json: JsonOption = False, nats_url: NatsUrl = None,
           data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Remove SESSION's blocks that repeat an earlier block of the same type (whitespace aside)."""
    reply = _run(nats_url, data_dir, lambda ctx: ctx.dedupe(session))
    _print_change(reply, as_json, f"removed {len(reply.removed)} duplicate blocks")


@app.command("export")
def export(session: SessionArg,
           out: Annotated[Path | None, typer.Option("--out", dir_okay=False, help="Write the package here "
                                                    "(default: stdout).")] = None,
           nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Print SESSION as a package (JSON) that `toolbus ctx import` hands to another agent."""
    package = _run(nats_url, data_dir, lambda ctx: ctx.export(session))
    document = package.model_dump_json(indent=2) + "\n"
    if out is None:
        sys.stdout.write(document)
        return
    try:
        out.write_text(document, encoding="utf-8")
    except OSError as error:
        errors.print(f"error: cannot write {escape(str(out))}: {escape(error.strerror or str(error))}")
        raise typer.Exit(EXIT_REFUSED) from None
    errors.print(f"exported {escape(session)} ({_fullness(package.session.metrics)}) to {escape(str(out))}")


@app.command("import")
def import_session(source: Annotated[str, typer.Argument(metavar="FILE|-", help="A package from `toolbus ctx "
                                                         "export`, or - to read it from stdin.")],
                   agent: Annotated[str, typer.Option("--agent", help="The agent the new session belongs to.")],
                   session_id: Annotated[str | None, typer.Option("--session-id", help="The new session's id "
                                                                  "(default: a new UUIDv7).")] = None,
                   as_json: JsonOption = False, nats_url: NatsUrl = None,
                   data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Store an exported package as a new session of --agent (same blocks); print its id."""
    package = read_package(source)
    session = _run(nats_url, data_dir, lambda ctx: ctx.import_package(package, agent, session_id=session_id))
    if as_json:
        _print_json(session)
        return
    print(session.session_id)
    errors.print(f"imported session {escape(package.session.session_id)} of agent "
                 f"{escape(package.session.agent_id)} as session {escape(session.session_id)} of agent "
                 f"{escape(agent)} ({_fullness(session.metrics)})")


@app.command("delete")
def delete(session: SessionArg, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Delete SESSION and all its blocks."""
    _run(nats_url, data_dir, lambda ctx: ctx.delete(session))
    console.print(f"deleted {escape(session)}", soft_wrap=True)


@app.command("forget-user")
def forget_user(user: Annotated[str, typer.Argument(help="The user id given to `create --user`.")],
                yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
                nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Delete every session of USER (a privacy request); print the ids deleted, one a line."""
    if not yes:
        typer.confirm(f"delete every context session of user {user}?", abort=True)
    deleted = _run(nats_url, data_dir, lambda ctx: ctx.forget_user(user))
    for session_id in deleted:
        print(session_id)
    errors.print(f"forgot user {escape(user)}: {len(deleted)} sessions deleted")


@app.command("search")
def search(agent: Annotated[str | None, typer.Option("--agent", help="Only sessions of this agent.")] = None,
           user: Annotated[str | None, typer.Option("--user", help="Only sessions of this user.")] = None,
           meta: MetaOption = None,
           limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="At most this many.")] = 100,
           as_json: JsonOption = False, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List the sessions matching every criterion given, most recently changed first."""
    metadata = parse_meta(meta)
    found = _run(nats_url, data_dir, lambda ctx: ctx.search(agent_id=agent, user_id=user, metadata=metadata,
                                                            limit=limit))
    if as_json:
        print(json.dumps([summary.model_dump(mode="json") for summary in found], indent=2))
        return
    print_summaries(found)


# --- output ------------------------------------------------------------------------------------------


def print_session(session: Session) -> None:
    """A session's owner and fullness, then one row per block: id, type, tokens, relevance, content."""
    user = f", user {session.user_id}" if session.user_id else ""
    console.print(escape(f"session {session.session_id} of agent {session.agent_id}{user}, version "
                         f"{session.version}"), soft_wrap=True)
    console.print(escape(f"{_fullness(session.metrics)} of {session.max_tokens}"), soft_wrap=True)
    if session.metadata:
        console.print(escape(f"metadata: {_pairs(session.metadata)}"), soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for header in ("id", "type", "tokens", "relevance", "content"):
        table.add_column(header, overflow="fold")
    for block in session.blocks:
        table.add_row(escape(block.id), block.type.value, str(block.token_count), f"{block.relevance:.3f}",
                      escape(_preview(block.content)))
    console.print(table)


def print_summaries(sessions: list[SessionSummary]) -> None:
    """One row per session found, or a line saying there is none."""
    if not sessions:
        console.print("no sessions match")
        return
    table = Table(title=f"{len(sessions)} sessions", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for header in ("session", "agent", "user", "version", "blocks", "tokens", "saturation", "updated", "metadata"):
        table.add_column(header, overflow="fold")
    for s in sessions:
        table.add_row(*(escape(cell) for cell in (
            s.session_id, s.agent_id, s.user_id or "-", str(s.version), str(s.metrics.blocks),
            str(s.metrics.total_tokens), f"{s.metrics.saturation:.1%}", _when(s.updated_ms),
            _pairs(s.metadata) or "-")))
    console.print(table)


def _print_change(reply: ChangeReply, as_json: bool, what: str) -> None:
    if as_json:
        _print_json(reply)
        return
    console.print(escape(f"{reply.session_id}: {what}; version {reply.version}, {_fullness(reply.metrics)}"),
                  soft_wrap=True)


def _print_json(model: BaseModel) -> None:
    print(model.model_dump_json(indent=2))


def _fullness(metrics: SessionMetrics) -> str:
    return f"{metrics.blocks} blocks, {metrics.total_tokens} tokens (saturation {metrics.saturation:.1%})"


def _preview(content: str) -> str:
    flat = " ".join(content.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def _pairs(metadata: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(metadata.items()))


def _when(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- talking to the store ----------------------------------------------------------------------------


def _run(nats_url: str | None, data_dir: Path, action: Callable[[ContextClient], Awaitable[T]]) -> T:
    """Run one request against the context store, then disconnect; a refusal exits 1, no mesh exits 2."""
    url, prefix = resolve_bus(nats_url, data_dir)
    subjects = Subjects(prefix)

    async def run() -> T:
        nc = await connect_once(url, name="toolbus-ctx")
        try:
            return await action(ContextClient(nc, subjects, REQUEST_TIMEOUT_S))
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except typer.Exit:
        raise typer.Exit(EXIT_NO_MESH) from None  # only connect_once exits in there, and it said why
    except ContextRefused as refused:
        _print_refusal(refused)
        raise typer.Exit(EXIT_REFUSED) from None
    except ValidationError as error:  # a request the SDK would not send: an argument breaks the contract
        raise typer.BadParameter(first_problem(error, "value")) from None
    except (ContextUnavailable, nats.errors.Error) as error:
        errors.print(f"error: no context store answered on {escape(subjects.ctx('*'))} at {escape(url)}: "
                     f"{escape(str(error) or type(error).__name__)} (is `toolbus up` running, with "
                     "context.enabled: true?)")
        raise typer.Exit(EXIT_NO_MESH) from None


def _print_refusal(refused: ContextRefused) -> None:
    errors.print(f"error: {escape(refused.message)} ({escape(refused.reason or str(refused.code))})")
    current = refused.current_version
    if current is not None:
        errors.print(f"the session is at version {current}: read it again, then retry with --if-version {current}")

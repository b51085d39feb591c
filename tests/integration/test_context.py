"""The context store through the real mesh: handoff, optimistic concurrency, tool results filed
exactly once, forget-user with its audit trail, limits and clear refusals.

Router, executor (real demo, git and time MCP servers), context store and audit writer run
in-process against the module's nats-server and the session's redis-server, under a prefix of
this module's own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.context.tokens import count_tokens
from services.context.tool_results import block_id
from shared.audit.entries import decode_record
from shared.audit.notes import SigningKey
from shared.client import ToolbusClient
from shared.codec import pack, unpack
from shared.contracts import Event, EventKind
from shared.contracts.context import BlockType, NewBlock, Session
from shared.embedded import NatsServer, RedisServer
from shared.errors import ContextRefused
from shared.mesh import write_key_pair
from shared.outcomes import now_ms
from shared.subjects import Subjects
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import InProcessMesh, eventually, verify_audit_log

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"ctx{uuid.uuid4().hex[:8]}"
BUDGET = 400


class ContextMesh:
    def __init__(self, mesh: InProcessMesh, key: SigningKey) -> None:
        self.mesh = mesh
        self.key = key


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(git_repo: Path, nats_server: NatsServer, redis_server: RedisServer,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ContextMesh]:
    key = SigningKey.generate("toolbus-main")
    key_path = tmp_path_factory.mktemp("audit") / "log.key"
    write_key_pair(key, key_path)
    config = make_config(git_repo, prefix=PREFIX, audit={"checkpoint_every": 200, "checkpoint_interval_s": 0.3},
                         context={"max_tokens": 4000, "max_block_bytes": 20_000, "max_blocks": 200})
    async with InProcessMesh(nats_server.url, config, redis_server.url, audit_key=key_path, context=True) as mesh:
        yield ContextMesh(mesh, key)


@pytest_asyncio.fixture(loop_scope="module")
async def client(running: ContextMesh) -> AsyncIterator[ToolbusClient]:
    async with ToolbusClient(running.mesh.nats_url, ADMIN_KEY, prefix=PREFIX) as producer:
        yield producer


def turn(kind: BlockType, text: str, **fields: object) -> NewBlock:
    return NewBlock.model_validate({"type": kind, "content": text, **fields})


async def tool_blocks(client: ToolbusClient, session_id: str, count: int) -> Session:
    """The session once it holds `count` TOOL blocks (they arrive asynchronously)."""
    async def probe() -> Session | None:
        session = await client.context.get(session_id)
        return session if sum(b.type is BlockType.TOOL for b in session.blocks) >= count else None

    return await eventually(probe, timeout=20)


async def test_handoff_renders_byte_identical_text_for_the_receiving_agent(
        client: ToolbusClient, git_repo: Path) -> None:
    """A's session (system prompt, 3 turns each way, 2 real tool results), imported by B, renders the same bytes."""
    ctx = client.context
    session = await ctx.create("agent-a", user_id="hand-user", metadata={"task": "handoff"},
                               blocks=[turn(BlockType.SYSTEM, "You are a careful release engineer.")])
    for n in range(3):
        await ctx.append(session.session_id, [turn(BlockType.USER, f"Question {n}: what changed in the repo?"),
                                              turn(BlockType.AGENT, f"Answer {n}: let me look at git.")])
    status = await client.call("git__git_status", {"repo_path": str(git_repo)}, session=session.session_id)
    now = await client.call("time__get_current_time", {"timezone": "UTC"}, session=session.session_id)
    a_session = await tool_blocks(client, session.session_id, 2)

    package = await ctx.export(session.session_id)
    b_session = await ctx.import_package(package, "agent-b")
    a_render = await ctx.render(session.session_id, BUDGET)
    b_render = await ctx.render(b_session.session_id, BUDGET)

    assert b_session.session_id != session.session_id and b_session.agent_id == "agent-b"
    assert [(b.id, b.type, b.content, b.token_count, b.relevance) for b in b_session.blocks] == \
        [(b.id, b.type, b.content, b.token_count, b.relevance) for b in a_session.blocks]
    assert a_render.text.encode() == b_render.text.encode()
    assert a_render.tokens == b_render.tokens == count_tokens(b_render.text) <= BUDGET
    tool_texts = {b.metadata["call_id"]: b.content for b in a_session.blocks if b.type is BlockType.TOOL}
    assert tool_texts == {status.call_id: status.text, now.call_id: now.text}


async def test_fifty_concurrent_appenders_with_if_version_lose_no_block(client: ToolbusClient) -> None:
    """50 writers append at the version they read: a conflict names a newer version, a retry wins, no block is lost."""
    ctx = client.context
    session = await ctx.create("agent-race")
    conflicts: list[tuple[int, ContextRefused]] = []

    async def appender(n: int) -> None:
        version = session.version
        while True:
            try:
                await ctx.append(session.session_id, [turn(BlockType.MEMORY, f"fact {n}", id=f"fact-{n}")],
                                 if_version=version)
                return
            except ContextRefused as refused:
                conflicts.append((version, refused))
                version = refused.current_version if refused.current_version is not None else version

    await asyncio.gather(*(appender(n) for n in range(50)))
    final = await ctx.get(session.session_id)
    assert sorted(b.id for b in final.blocks) == sorted(f"fact-{n}" for n in range(50))
    assert final.version == 50
    assert conflicts, "50 writers starting from one version must collide"
    assert all(refused.reason == "version_conflict" for _, refused in conflicts)
    assert all((refused.current_version or 0) > stale for stale, refused in conflicts)


async def test_same_if_version_exactly_one_of_two_writers_wins(client: ToolbusClient) -> None:
    """Two appends at the same if_version: one is stored, the other is refused with the new version, then succeeds."""
    ctx = client.context
    session = await ctx.create("agent-pair")
    first, second = await asyncio.gather(
        *(ctx.append(session.session_id, [turn(BlockType.USER, text)], if_version=0) for text in ("one", "two")),
        return_exceptions=True)
    outcomes = [first, second]
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, ContextRefused)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].code == -32009 and lost[0].current_version == 1
    retried = await ctx.append(session.session_id, [turn(BlockType.USER, "retry")], if_version=1)
    assert retried.version == 2
    assert [b.content for b in (await ctx.get(session.session_id)).blocks][-1] == "retry"


async def test_redelivered_completion_event_appends_the_tool_block_once(
        running: ContextMesh, client: ToolbusClient) -> None:
    """A call with Toolbus-Session appears once as a TOOL block even when its completion event is published again."""
    ctx = client.context
    session = await ctx.create("agent-tool")
    result = await client.call("demo__echo", {"text": "exactly once"}, session=session.session_id)
    first = await tool_blocks(client, session.session_id, 1)
    events = await EventWatch.start(running.mesh.nats_url, EventKind.CTX_BLOCK_ADDED)
    try:
        duplicate = Event(kind=EventKind.CALL_COMPLETED, ts_ms=now_ms(), source="test-replay", call_id=result.call_id,
                          tool="demo__echo", session=session.session_id, status=result.status)
        nc = await nats.connect(running.mesh.nats_url)
        try:  # the same event again, under another source so EVENTS does not dedupe it
            await nc.jetstream().publish(Subjects(PREFIX).event("call.completed"), pack(duplicate))
        finally:
            await nc.close()
        await eventually(lambda: consumer_idle(running.mesh.nats_url), timeout=20)
        again = await ctx.get(session.session_id)
    finally:
        added = await events.stop()
    tool = [b for b in again.blocks if b.type is BlockType.TOOL]
    assert [b.id for b in tool] == [block_id(result.call_id)]
    assert tool[0].content == "exactly once"
    assert tool[0].metadata == {"tool": "demo__echo", "call_id": result.call_id, "is_error": "false", "status": "ok"}
    assert again.version == first.version
    assert added == [], "a replayed completion must not announce a block"


class EventWatch:
    """Collects the events of one kind published while it runs."""

    def __init__(self, nc: NatsClient, seen: list[Event]) -> None:
        self.nc = nc
        self.seen = seen

    @classmethod
    async def start(cls, url: str, kind: EventKind) -> EventWatch:
        nc = await nats.connect(url)
        seen: list[Event] = []

        async def on_event(msg: Msg) -> None:
            seen.append(unpack(Event, msg.data))

        await nc.subscribe(Subjects(PREFIX).event(kind.value), cb=on_event)
        return cls(nc, seen)

    async def stop(self) -> list[Event]:
        await self.nc.flush()
        await self.nc.close()
        return self.seen


async def consumer_idle(url: str) -> bool:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("EVENTS", "context")
    finally:
        await nc.close()
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def test_forget_user_deletes_every_session_emits_events_and_audits_without_content(
        running: ContextMesh, client: ToolbusClient) -> None:
    """forget-user removes the user's sessions, emits ctx.deleted for each; the audit log has them, minus content."""
    ctx = client.context
    secret = f"private-note-{uuid.uuid4().hex}"
    mine = [await ctx.create(f"agent-{n}", user_id="forget-me", blocks=[turn(BlockType.USER, secret)])
            for n in range(3)]
    other = await ctx.create("agent-0", user_id="keep-me", blocks=[turn(BlockType.USER, "stay")])
    events = await EventWatch.start(running.mesh.nats_url, EventKind.CTX_DELETED)
    try:
        deleted = await ctx.forget_user("forget-me")
        await eventually(lambda: asyncio.sleep(0, len(events.seen) >= 3))
    finally:
        seen = await events.stop()

    assert sorted(deleted) == sorted(s.session_id for s in mine)
    assert await ctx.search(user_id="forget-me") == []
    for session in mine:
        with pytest.raises(ContextRefused) as missing:
            await ctx.get(session.session_id)
        assert missing.value.reason == "session_not_found" and missing.value.code == -32004
    assert (await ctx.get(other.session_id)).blocks[0].content == "stay"
    assert sorted(e.session or "" for e in seen) == sorted(deleted)
    assert all(e.detail["reason"] == "forget_user" and e.detail["user"] == "forget-me" for e in seen)

    async def audited() -> list[dict[str, object]] | None:
        records, _report = await verify_audit_log(running.mesh.nats_url, PREFIX, running.key.verifier)
        bodies = [decode_record(r.data)[0] for r in records]
        found = [b for b in bodies if b["event"]["action"] == "ctx.deleted"
                 and b["event"]["resource"]["id"] in deleted]
        return found if len(found) == 3 else None

    records = await eventually(audited, timeout=20)
    assert all(secret not in str(record) for record in records)
    _records, report = await verify_audit_log(running.mesh.nats_url, PREFIX, running.key.verifier)
    assert report.ok

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

import msgpack
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from redis.asyncio import Redis

from services.context.tokens import count_tokens
from services.context.tool_results import block_id
from shared.audit.entries import decode_record
from shared.audit.notes import SigningKey
from shared.client import ToolbusClient
from shared.codec import pack, unpack
from shared.contracts import Event, EventKind
from shared.contracts.context import AppendReply, BlockType, NewBlock, RescoreMethod, Session
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
                         context={"max_tokens": 4000, "max_block_bytes": 20_000, "max_blocks": 200,
                                  "max_session_bytes": 60_000})
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


async def test_appending_past_prune_at_prunes_least_relevant_blocks_and_keeps_system(
        running: ContextMesh, client: ToolbusClient) -> None:
    """Crossing prune_at drops the least relevant non-SYSTEM blocks down to prune_to, announces it, keeps SYSTEM."""
    ctx = client.context
    session = await ctx.create("agent-prune", max_tokens=300,
                               blocks=[turn(BlockType.SYSTEM, "Always answer in French.")])
    events = await EventWatch.start(running.mesh.nats_url, EventKind.CTX_PRUNED)
    try:
        for n in range(12):
            reply = await ctx.append(session.session_id, [turn(BlockType.KNOWLEDGE, "fact " * 40 + str(n),
                                                               id=f"k{n}", relevance=(n % 4 + 1) / 4)])
        await eventually(lambda: asyncio.sleep(0, bool(events.seen)))
    finally:
        pruned_events = await events.stop()
    final = await ctx.get(session.session_id)
    config = running.mesh.config.context
    assert final.metrics.saturation <= config.prune_at  # type: ignore[operator]
    assert any(b.type is BlockType.SYSTEM for b in final.blocks)
    kept = {b.id for b in final.blocks if b.type is BlockType.KNOWLEDGE}
    dropped = {f"k{n}" for n in range(12)} - kept
    assert dropped and {"k3", "k7", "k11"} <= kept, "the most relevant blocks (1.0) survive"
    assert sum(int(e.detail["blocks"] or 0) for e in pruned_events) == len(dropped)
    assert reply.metrics.total_tokens == final.metrics.total_tokens


async def test_limits_refuse_with_the_limit_and_size_named(client: ToolbusClient) -> None:
    """A block over max_block_bytes, a session over max_blocks and a budget below SYSTEM are refused with -32013."""
    ctx = client.context
    session = await ctx.create("agent-limits", blocks=[turn(BlockType.SYSTEM, "You are terse. " * 40)])
    with pytest.raises(ContextRefused) as big:
        await ctx.append(session.session_id, [turn(BlockType.USER, "x" * 20_001)])
    assert big.value.code == -32013 and big.value.data["limit"] == 20_000 and big.value.data["size"] == 20_001
    with pytest.raises(ContextRefused) as many:
        await ctx.append(session.session_id, [turn(BlockType.USER, f"t{n}") for n in range(200)])
    assert many.value.reason == "context_too_large" and many.value.data["size"] == 201
    roomy = await ctx.create("agent-bytes", max_tokens=10**6)
    for n in range(3):  # 3 blocks of ~19 kB fit 60 kB, the 4th would not
        await ctx.append(roomy.session_id, [turn(BlockType.KNOWLEDGE, f"{n} " + "z " * 9_500)])
    with pytest.raises(ContextRefused) as heavy:
        await ctx.append(roomy.session_id, [turn(BlockType.KNOWLEDGE, "3 " + "z " * 9_500)])
    assert heavy.value.reason == "context_too_large" and heavy.value.data["limit"] == 60_000
    assert heavy.value.data["size"] > 60_000 and "NATS message" in heavy.value.message
    with pytest.raises(ContextRefused) as small:
        await ctx.render(session.session_id, budget_tokens=10)
    assert small.value.reason == "context_too_large" and small.value.data["limit"] == 10
    assert (await ctx.get(session.session_id)).version == session.version, "refusals change nothing"
    assert (await ctx.get(roomy.session_id)).version == 3


async def test_capacity_held_by_system_blocks_refuses_without_pruning(client: ToolbusClient) -> None:
    """When SYSTEM blocks leave no room, an append is refused and nothing is pruned first."""
    ctx = client.context
    session = await ctx.create("agent-full", max_tokens=60, blocks=[
        turn(BlockType.SYSTEM, "rule " * 40), turn(BlockType.MEMORY, "remember this", id="memo")])
    with pytest.raises(ContextRefused) as full:
        await ctx.append(session.session_id, [turn(BlockType.USER, "word " * 30)])
    assert full.value.reason == "context_too_large"
    assert [b.id for b in (await ctx.get(session.session_id)).blocks][-1] == "memo"


async def test_appending_a_known_block_id_again_is_a_no_op(client: ToolbusClient) -> None:
    """Re-sending a block id the session has (even after it was pruned) is skipped, not appended again."""
    ctx = client.context
    session = await ctx.create("agent-retry")
    first = await ctx.append(session.session_id, [turn(BlockType.USER, "hello", id="turn-1")])
    again = await ctx.append(session.session_id, [turn(BlockType.USER, "hello", id="turn-1")])
    assert first.block_ids == ["turn-1"] and again.skipped == ["turn-1"] and again.block_ids == []
    assert again.version == first.version
    await ctx.prune(session.session_id, target_saturation=0)
    after_prune = await ctx.append(session.session_id, [turn(BlockType.USER, "hello", id="turn-1")])
    assert after_prune.skipped == ["turn-1"]
    assert (await ctx.get(session.session_id)).blocks == []


async def test_rescore_reorders_what_render_keeps(client: ToolbusClient) -> None:
    """After a rescore against a query, the blocks matching it are the ones a tight render keeps."""
    ctx = client.context
    session = await ctx.create("agent-rescore", blocks=[
        turn(BlockType.KNOWLEDGE, "The deploy pipeline runs on Fridays and uses blue green releases.", id="deploy"),
        turn(BlockType.KNOWLEDGE, "Lunch is served at noon in the cafeteria on the second floor.", id="lunch"),
        turn(BlockType.MEMORY, "The user prefers concise answers about deploy steps.", id="prefs")])
    for method in RescoreMethod:
        change = await ctx.rescore(session.session_id, "deploy pipeline release", method=method)
        scored = {b.id: b.relevance for b in (await ctx.get(session.session_id)).blocks}
        assert scored["deploy"] > scored["prefs"] > scored["lunch"] == 0.0, (method, scored)
        assert change.version == (await ctx.get(session.session_id)).version
    tight = await ctx.render(session.session_id, budget_tokens=25)
    assert tight.included == ["deploy"]
    with pytest.raises(ContextRefused) as stale:
        await ctx.rescore(session.session_id, "lunch", if_version=0)
    assert stale.value.reason == "version_conflict"


async def test_dedupe_keeps_the_first_copy_with_the_best_relevance(client: ToolbusClient) -> None:
    """Dedupe removes repeated blocks of the same type (whitespace aside) and raises the survivor's relevance."""
    ctx = client.context
    session = await ctx.create("agent-dedupe", blocks=[
        turn(BlockType.MEMORY, "the  sky is blue", id="a", relevance=0.2),
        turn(BlockType.MEMORY, "the sky is\nblue", id="b", relevance=0.9),
        turn(BlockType.KNOWLEDGE, "the sky is blue", id="c")])
    change = await ctx.dedupe(session.session_id)
    blocks = {b.id: b for b in (await ctx.get(session.session_id)).blocks}
    assert change.removed == ["b"] and change.changed == ["a"]
    assert set(blocks) == {"a", "c"} and blocks["a"].relevance == 0.9


async def test_search_finds_sessions_by_agent_user_and_metadata(client: ToolbusClient) -> None:
    """Search returns exactly the sessions matching every criterion, newest first."""
    ctx = client.context
    tag = uuid.uuid4().hex
    made = [await ctx.create("agent-search", user_id=f"u-{tag}", metadata={"tag": tag, "n": str(n)})
            for n in range(3)]
    await ctx.create("agent-search", metadata={"tag": "other"})
    by_user = await ctx.search(user_id=f"u-{tag}")
    by_meta = await ctx.search(agent_id="agent-search", metadata={"tag": tag, "n": "1"})
    assert sorted(s.session_id for s in by_user) == sorted(s.session_id for s in made)
    assert [s.session_id for s in by_meta] == [made[1].session_id]


async def test_every_use_refreshes_the_session_ttl(running: ContextMesh, client: ToolbusClient,
                                                   redis_server: RedisServer) -> None:
    """Reading a session sets every key of it back to the configured TTL."""
    ctx = client.context
    session = await ctx.create("agent-ttl", blocks=[turn(BlockType.USER, "hi")])
    redis = Redis.from_url(redis_server.url)
    keys = [f"{PREFIX}:ctx:s:{session.session_id}:{part}" for part in ("meta", "blocks", "order", "seen")]
    try:
        for key in keys:
            await redis.pexpire(key, 5_000)
        await ctx.render(session.session_id, budget_tokens=100)
        ttls = [await redis.pttl(key) for key in keys]
    finally:
        await redis.aclose()
    ttl_ms = running.mesh.config.context.ttl_s * 1000
    assert all(ttl_ms - 60_000 < ttl <= ttl_ms for ttl in ttls), ttls


async def test_bad_requests_get_clear_errors_and_the_store_keeps_answering(
        running: ContextMesh, client: ToolbusClient) -> None:
    """Garbage bytes, wrong field types and unknown sessions are refused with a reason; the next request works."""
    nc = await nats.connect(running.mesh.nats_url)
    subjects = Subjects(PREFIX)
    try:
        garbage = unpack(AppendReply, (await nc.request(subjects.ctx("append"), b"\xc1\xff", timeout=5)).data)
        wrong = unpack(AppendReply, (await nc.request(
            subjects.ctx("append"), msgpack.packb({"session_id": 7, "blocks": "no"}), timeout=5)).data)
    finally:
        await nc.close()
    assert garbage.error is not None and garbage.error.code == -32600 and "not msgpack" in garbage.error.message
    assert wrong.error is not None and wrong.error.reason == "invalid_request" and "session_id" in wrong.error.message
    with pytest.raises(ContextRefused) as unknown:
        await client.context.append("no-such-session", [turn(BlockType.USER, "hi")])
    assert unknown.value.code == -32004
    assert (await client.context.create("agent-after-garbage")).version == 0


async def test_tool_errors_are_filed_with_is_error_and_deleted_sessions_are_skipped(
        running: ContextMesh, client: ToolbusClient) -> None:
    """A failing tool's result is filed with is_error=true; a result for a deleted session is dropped, not retried."""
    ctx = client.context
    session = await ctx.create("agent-errors")
    gone = await ctx.create("agent-gone")
    await ctx.delete(gone.session_id)
    failed = await client.call("demo__fail", {"message": "boom"}, session=session.session_id)
    await client.call("demo__echo", {"text": "nobody home"}, session=gone.session_id)
    filed = await tool_blocks(client, session.session_id, 1)
    await eventually(lambda: consumer_idle(running.mesh.nats_url), timeout=20)
    block = next(b for b in filed.blocks if b.type is BlockType.TOOL)
    assert block.metadata["is_error"] == "true" and block.metadata["call_id"] == failed.call_id
    assert "boom" in block.content
    with pytest.raises(ContextRefused):
        await ctx.get(gone.session_id)


async def test_search_by_metadata_alone_looks_past_the_newest_sessions(client: ToolbusClient) -> None:
    """A metadata-only search finds a match older than many newer sessions, and bad ids are refused client-side."""
    ctx = client.context
    tag = uuid.uuid4().hex
    wanted = await ctx.create("agent-old", metadata={"rare": tag})
    for n in range(12):
        await ctx.create("agent-new", metadata={"n": str(n)})
    assert [s.session_id for s in await ctx.search(metadata={"rare": tag}, limit=1)] == [wanted.session_id]
    with pytest.raises(ContextRefused) as bad:
        await ctx.get("../not an id")
    assert bad.value.code == -32600 and "session_id" in bad.value.message


async def test_export_and_import_are_announced_without_content(running: ContextMesh, client: ToolbusClient) -> None:
    """Export and import each emit an event naming the sessions and their sizes, never their text."""
    ctx = client.context
    secret = f"handoff-secret-{uuid.uuid4().hex}"
    session = await ctx.create("agent-x", user_id="evt-user", blocks=[turn(BlockType.USER, secret)])
    exported = await EventWatch.start(running.mesh.nats_url, EventKind.CTX_EXPORTED)
    imported = await EventWatch.start(running.mesh.nats_url, EventKind.CTX_IMPORTED)
    try:
        copy = await ctx.import_package(await ctx.export(session.session_id), "agent-y")
        await eventually(lambda: asyncio.sleep(0, bool(exported.seen and imported.seen)))
    finally:
        [out], [into] = await exported.stop(), await imported.stop()
    assert out.session == session.session_id and out.detail["blocks"] == 1 and out.detail["user"] == "evt-user"
    assert into.session == copy.session_id and into.detail["from_session"] == session.session_id
    assert into.detail["agent_id"] == "agent-y" and into.detail["from_agent"] == "agent-x"
    assert secret not in repr(out) + repr(into)

"""Context sessions in Redis: one key family per session, changed only by atomic scripts.

    <prefix>:ctx:s:<id>:meta    hash: agent, user, trace, times, capacity, metadata, counters, version
    <prefix>:ctx:s:<id>:blocks  hash: block id -> msgpack Block
    <prefix>:ctx:s:<id>:order   zset: block id -> position (append order)
    <prefix>:ctx:s:<id>:seen    set: every block id the session ever held (appends are idempotent)
    <prefix>:ctx:all            zset: session id -> last change (ms), for search
    <prefix>:ctx:agent:<id>     set: the agent's session ids
    <prefix>:ctx:user:<id>      set: the user's session ids (forget-user)

The four session keys share a TTL, refreshed by every read and write. The index keys have none:
a member whose session expired is dropped when a search or forget-user meets it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
from redis.asyncio import Redis

from shared.contracts.context import Block, BlockType, Session, SessionMetrics, SessionSummary
from shared.redis_client import bundled_script

META_FIELDS = ("agent_id", "user_id", "trace_id", "created_ms", "updated_ms", "max_tokens", "metadata")


@dataclass(frozen=True)
class Change:
    """What one commit does to a session."""

    add: Sequence[Block] = ()
    replace: Sequence[Block] = ()
    delete: Sequence[str] = ()


@dataclass(frozen=True)
class Limits:
    """What a commit that adds blocks must stay within."""

    ttl_ms: int
    max_blocks: int
    max_bytes: int  # stored blocks, so a whole session fits one NATS reply
    enforce_capacity: bool = True  # an import keeps every block even above this mesh's capacity


@dataclass(frozen=True)
class Committed:
    """A commit's outcome: `status` ok, missing, conflict, too_large (tokens), too_many (blocks) or too_big (bytes)."""

    status: str
    version: int = 0
    tokens: int = 0
    blocks: int = 0
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metrics: SessionMetrics = field(default_factory=SessionMetrics)  # after the commit (status ok)
    stored_bytes: int = 0  # the session's stored size (status too_big)


class SessionStore:
    """Reads and atomic writes of context sessions under one key prefix.

    `redis` must return bytes (no `decode_responses`): blocks are stored as msgpack.
    """

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:ctx"
        self._commit = redis.register_script(bundled_script("services.context", "commit"))
        self._create = redis.register_script(bundled_script("services.context", "create"))

    def _keys(self, session_id: str) -> list[str]:
        base = f"{self._prefix}:s:{session_id}"
        return [f"{base}:meta", f"{base}:blocks", f"{base}:order", f"{base}:seen"]

    @property
    def _all(self) -> str:
        return f"{self._prefix}:all"

    def _index(self, kind: str, owner: str) -> str:
        return f"{self._prefix}:{kind}:{owner}"

    async def create(self, summary: SessionSummary, ttl_ms: int) -> bool:
        """Store a new empty session; False if its id is taken."""
        meta: dict[str, str | int] = {
            "agent_id": summary.agent_id, "user_id": summary.user_id or "", "trace_id": summary.trace_id or "",
            "created_ms": summary.created_ms, "updated_ms": summary.updated_ms, "max_tokens": summary.max_tokens,
            "metadata": json.dumps(summary.metadata, sort_keys=True), "version": 0, "tokens": 0, "blocks": 0,
            "next_pos": 0,
        }
        keys = [self._keys(summary.session_id)[0], self._all, self._index("agent", summary.agent_id)]
        if summary.user_id:
            keys.append(self._index("user", summary.user_id))
        fields = [item for pair in meta.items() for item in pair]
        return bool(await self._create(keys=keys, args=[summary.session_id, summary.created_ms, ttl_ms, *fields]))

    async def commit(self, session_id: str, change: Change, expected: int | None, now_ms: int,
                     limits: Limits) -> Committed:
        """Apply `change` atomically if the session is at `expected` (None: any version)."""
        puts = [("add", block) for block in change.add] + [("set", block) for block in change.replace]
        spec = {
            "session_id": session_id, "expected": "" if expected is None else str(expected), "now": now_ms,
            "ttl_ms": limits.ttl_ms, "cap": int(limits.enforce_capacity), "max_blocks": limits.max_blocks,
            "max_bytes": limits.max_bytes,
            "delete": list(change.delete),
            "put": [{"mode": mode, "id": b.id, "tokens": b.token_count, "type": b.type.value} for mode, b in puts],
            "types": [kind.value for kind in BlockType],
        }
        packed = [pack_block(block) for _, block in puts]
        keys = [*self._keys(session_id), self._all]
        reply = await self._commit(keys=keys, args=[json.dumps(spec), *packed])
        return _committed(reply)

    async def read(self, session_id: str, ttl_ms: int) -> Session | None:
        """The whole session (one consistent snapshot), refreshing its TTL; None if it does not exist."""
        meta_key, blocks_key, order_key, seen_key = self._keys(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.hgetall(blocks_key)
            pipe.zrange(order_key, 0, -1)
            for key in (meta_key, blocks_key, order_key, seen_key):
                pipe.pexpire(key, ttl_ms)
            meta, blocks, order, *_ = await pipe.execute()
        if not meta:
            return None
        ordered = [unpack_block(blocks[block_id]) for block_id in order if block_id in blocks]
        return Session(**_summary_fields(session_id, _decoded(meta)), blocks=ordered)

    async def summaries(self, session_ids: Sequence[str]) -> list[SessionSummary | None]:
        """Each session's summary (None for one that no longer exists)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.hgetall(self._keys(session_id)[0])
            metas = await pipe.execute()
        return [SessionSummary(**_summary_fields(sid, _decoded(meta))) if meta else None
                for sid, meta in zip(session_ids, metas, strict=True)]

    async def delete(self, session_id: str) -> SessionSummary | None:
        """Remove a session and its index entries; what it was (None if it did not exist)."""
        summary = (await self.summaries([session_id]))[0]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*self._keys(session_id))
            pipe.zrem(self._all, session_id)
            if summary is not None:
                pipe.srem(self._index("agent", summary.agent_id), session_id)
                if summary.user_id:
                    pipe.srem(self._index("user", summary.user_id), session_id)
            deleted, *_ = await pipe.execute()
        return summary if deleted else None

    async def sessions_of(self, kind: str, owner: str) -> list[str]:
        """Session ids of one agent (`kind` "agent") or user ("user")."""
        return sorted(_text(member) for member in await self._redis.smembers(self._index(kind, owner)))

    async def recent(self, offset: int, count: int) -> list[str]:
        """Session ids by last change, newest first: `count` of them from `offset`."""
        members = cast(list[bytes], await self._redis.zrevrange(self._all, offset, offset + count - 1))
        return [_text(member) for member in members]

    async def forget_index_entries(self, stale: Sequence[tuple[str, str | None, str | None]]) -> None:
        """Drop index members (session id, agent, user) whose session expired."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id, agent_id, user_id in stale:
                pipe.zrem(self._all, session_id)
                if agent_id:
                    pipe.srem(self._index("agent", agent_id), session_id)
                if user_id:
                    pipe.srem(self._index("user", user_id), session_id)
            await pipe.execute()


def pack_block(block: Block) -> bytes:
    """A block's stored form (msgpack of its JSON-mode dump; the commit script reads it)."""
    packed: bytes = msgpack.packb(block.model_dump(mode="json"), use_bin_type=True)
    return packed


def unpack_block(data: bytes) -> Block:
    return Block.model_validate(msgpack.unpackb(data, raw=False))


def _summary_fields(session_id: str, meta: dict[str, str]) -> dict[str, Any]:
    max_tokens, tokens = int(meta["max_tokens"]), int(meta.get("tokens", 0))
    counts = {kind.value: int(meta.get(f"n:{kind.value}", 0)) for kind in BlockType}
    distribution = {kind: count for kind, count in counts.items() if count}
    return {
        "session_id": session_id, "agent_id": meta["agent_id"], "user_id": meta.get("user_id") or None,
        "trace_id": meta.get("trace_id") or None, "version": int(meta["version"]),
        "created_ms": int(meta["created_ms"]), "updated_ms": int(meta["updated_ms"]), "max_tokens": max_tokens,
        "metadata": json.loads(meta.get("metadata") or "{}"),
        "metrics": SessionMetrics(total_tokens=tokens, saturation=round(tokens / max_tokens, 6),
                                  blocks=int(meta.get("blocks", 0)), type_distribution=distribution),
    }


def _committed(reply: list[Any]) -> Committed:
    status = _text(reply[0])
    numbers = [int(_text(value)) for value in reply[1:4]]
    if status == "ok":
        version, tokens, blocks = numbers
        max_tokens = int(_text(reply[6]))
        distribution = {kind.value: int(_text(n)) for kind, n in zip(BlockType, reply[7], strict=True) if int(_text(n))}
        metrics = SessionMetrics(total_tokens=tokens, saturation=round(tokens / max_tokens, 6), blocks=blocks,
                                 type_distribution=distribution)
        return Committed(status, version, tokens, blocks, [_text(v) for v in reply[4]], [_text(v) for v in reply[5]],
                         metrics)
    if status == "too_large":
        return Committed(status, version=numbers[0], tokens=numbers[1])
    if status == "too_many":
        return Committed(status, version=numbers[0], blocks=numbers[1])
    if status == "too_big":
        return Committed(status, version=numbers[0], stored_bytes=numbers[1])
    return Committed(status, version=numbers[0] if numbers else 0)  # conflict (current version) or missing


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(meta: dict[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in meta.items()}

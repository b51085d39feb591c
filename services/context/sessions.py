"""What each `toolbus.ctx.<verb>` does: the rules of the context store, free of NATS.

Every change is one atomic commit (`store.py`). A change computed from a read (prune, rescore,
dedupe) commits against the version it read and is recomputed if another writer got there first;
a client's `if_version` is instead answered with the conflict, since only the client can decide.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from services.context import pruning
from services.context.rendering import RenderSettings, render
from services.context.scoring import relevance
from services.context.store import Change, Committed, Limits, SessionStore
from services.context.tokens import count_many
from shared.config import ContextConfig
from shared.contracts import EventKind
from shared.contracts.context import (
    PACKAGE_FORMAT,
    TOKENIZER,
    AppendBlocks,
    AppendReply,
    Block,
    BlockType,
    ChangeReply,
    CreateSession,
    DeleteReply,
    ExportReply,
    ForgetUser,
    ImportSession,
    NewBlock,
    PruneSession,
    RenderContext,
    RenderReply,
    RescoreSession,
    SearchReply,
    SearchSessions,
    Session,
    SessionMetrics,
    SessionPackage,
    SessionRef,
    SessionReply,
    SessionSummary,
)
from shared.errors import ContextError, ContextTooLarge, InvalidRequest, SessionNotFound, VersionConflict
from shared.ids import new_call_id

log = structlog.get_logger(__name__)

Emit = Callable[..., Awaitable[None]]
SEARCH_PAGE = 500  # sessions read per round of a search without an agent or user
RETRIES = 8  # recomputing a read-modify-write that lost a race; each loser's rival made progress


@dataclass(frozen=True)
class Origin:
    """The call an append comes from (automatic TOOL blocks), for its event."""

    call_id: str | None = None
    tool: str | None = None
    principal: str | None = None


class ContextOperations:
    """The context store's operations over one `SessionStore`."""

    def __init__(self, store: SessionStore, config: ContextConfig, emit: Emit, clock: Callable[[], int]) -> None:
        self.store = store
        self.config = config
        self._emit = emit
        self._clock = clock

    @property
    def _limits(self) -> Limits:
        return Limits(ttl_ms=int(self.config.ttl_s * 1000), max_blocks=self.config.max_blocks,
                      max_bytes=self.config.max_session_bytes)

    # --- create, read ------------------------------------------------------------------------

    async def create(self, request: CreateSession) -> SessionReply:
        now = self._clock()
        summary = SessionSummary(
            session_id=request.session_id or new_call_id(), agent_id=request.agent_id, user_id=request.user_id,
            version=0, trace_id=request.trace_id, created_ms=now, updated_ms=now,
            max_tokens=request.max_tokens or self.config.max_tokens, metadata=request.metadata,
            metrics=SessionMetrics(),
        )
        blocks = self._new_blocks(request.blocks, now)
        if not await self.store.create(summary, self._limits.ttl_ms):
            raise InvalidRequest(f"session {summary.session_id} already exists", session_id=summary.session_id)
        if blocks:
            await self._commit_new(summary.session_id, blocks, None, Origin())
        return SessionReply(session=await self._read(summary.session_id))

    async def get(self, request: SessionRef) -> SessionReply:
        return SessionReply(session=await self._read(request.session_id))

    async def _read(self, session_id: str) -> Session:
        session = await self.store.read(session_id, self._limits.ttl_ms)
        if session is None:
            raise _not_found(session_id)
        return session

    # --- append ------------------------------------------------------------------------------

    async def append(self, request: AppendBlocks, origin: Origin | None = None) -> AppendReply:
        """Append blocks; prune first if they would not fit, and after if saturation crosses `prune_at`."""
        blocks = self._new_blocks(request.blocks, self._clock())
        committed = await self._commit_new(request.session_id, blocks, request.if_version, origin or Origin())
        prune_at = self.config.prune_at
        if prune_at is not None and committed.metrics.saturation > prune_at:
            try:
                pruned = await self.prune(PruneSession(session_id=request.session_id))
            except ContextError as error:  # the append is stored: report it, the next append prunes again
                log.warning("ctx.prune_deferred", session_id=request.session_id, reason=error.reason.value)
            else:
                return AppendReply(session_id=request.session_id, version=pruned.version, block_ids=committed.added,
                                   skipped=committed.skipped, pruned=pruned.removed, metrics=pruned.metrics)
        return AppendReply(session_id=request.session_id, version=committed.version, block_ids=committed.added,
                           skipped=committed.skipped, metrics=committed.metrics)

    def _new_blocks(self, blocks: Sequence[NewBlock], now: int) -> list[Block]:
        ids = [block.id for block in blocks if block.id is not None]
        if len(ids) != len(set(ids)):
            raise InvalidRequest("block ids must be unique within one request")
        for block in blocks:
            size = len(block.content.encode())
            if size > self.config.max_block_bytes:
                raise ContextTooLarge(f"a block of {size} bytes is over the limit of {self.config.max_block_bytes}",
                                      limit=self.config.max_block_bytes, size=size)
        counts = count_many([block.content for block in blocks])
        return [Block(id=block.id or new_call_id(), type=block.type, content=block.content,
                      relevance=block.relevance, metadata=block.metadata, references=block.references,
                      timestamp_ms=block.timestamp_ms if block.timestamp_ms is not None else now, token_count=count)
                for block, count in zip(blocks, counts, strict=True)]

    async def _commit_new(self, session_id: str, blocks: list[Block], if_version: int | None,
                          origin: Origin) -> Committed:
        committed = await self._commit(session_id, Change(add=blocks), if_version)
        if committed.status == "too_large" and self.config.prune_at is not None:
            room = sum(block.token_count for block in blocks)
            pruned = await self.prune(PruneSession(session_id=session_id), room_for=room,
                                      expected=committed.version if if_version is not None else None)
            committed = await self._commit(session_id, Change(add=blocks),
                                           pruned.version if if_version is not None else None)
        self._raise_for(committed, session_id, if_version)
        if committed.added:
            added_tokens = sum(b.token_count for b in blocks if b.id in set(committed.added))
            await self._emit(EventKind.CTX_BLOCK_ADDED, call_id=origin.call_id, tool=origin.tool,
                             principal=origin.principal, session=session_id,
                             detail={"session_id": session_id, "blocks": len(committed.added),
                                     "tokens": added_tokens, "version": committed.version})
        return committed

    async def _commit(self, session_id: str, change: Change, expected: int | None,
                      limits: Limits | None = None) -> Committed:
        return await self.store.commit(session_id, change, expected, self._clock(), limits or self._limits)

    def _raise_for(self, committed: Committed, session_id: str, if_version: int | None) -> None:
        if committed.status == "missing":
            raise _not_found(session_id)
        if committed.status == "conflict":
            raise VersionConflict(f"session {session_id} is at version {committed.version}, not {if_version}",
                                  session_id=session_id, current_version=committed.version)
        if committed.status == "too_large":
            why = "automatic pruning is off" if self.config.prune_at is None else "even after pruning"
            raise ContextTooLarge(f"session {session_id} would hold {committed.tokens} tokens, over its capacity "
                                  f"({why})", session_id=session_id, size=committed.tokens)
        if committed.status == "too_big":
            limit = self.config.max_session_bytes
            raise ContextTooLarge(f"session {session_id} would store {committed.stored_bytes} bytes, over the limit of "
                                  f"{limit} (a get or export must fit one NATS message)", session_id=session_id,
                                  size=committed.stored_bytes, limit=limit)
        if committed.status == "too_many":
            raise ContextTooLarge(f"session {session_id} would hold {committed.blocks} blocks, over the limit of "
                                  f"{self.config.max_blocks}", session_id=session_id, size=committed.blocks,
                                  limit=self.config.max_blocks)

    # --- prune, rescore, dedupe --------------------------------------------------------------

    async def prune(self, request: PruneSession, room_for: int = 0, expected: int | None = None) -> ChangeReply:
        """Drop the least relevant non-SYSTEM blocks until the session is under its target (and has `room_for`)."""
        target = request.target_saturation if request.target_saturation is not None else self.config.prune_to

        def plan(session: Session) -> Change:
            budget = min(int(target * session.max_tokens), session.max_tokens - room_for)
            kept = pruning.system_tokens(session.blocks)
            if room_for and kept + room_for > session.max_tokens:  # refuse before pruning anything
                raise ContextTooLarge(
                    f"{room_for} more tokens cannot fit session {session.session_id}: its SYSTEM blocks hold {kept} "
                    f"of its {session.max_tokens}", session_id=session.session_id, size=kept + room_for,
                    limit=session.max_tokens)
            return Change(delete=pruning.victims(session.blocks, budget, self._clock(), self.config.decay_half_life_s))

        reply = await self._rewrite(request.session_id, plan, expected)
        if reply.removed:
            await self._emit(EventKind.CTX_PRUNED, session=request.session_id, detail={
                "session_id": request.session_id, "blocks": len(reply.removed), "version": reply.version,
                "tokens": reply.metrics.total_tokens})
        return reply

    async def rescore(self, request: RescoreSession) -> ChangeReply:
        def plan(session: Session) -> Change:
            scored = [b for b in session.blocks if b.type is not BlockType.SYSTEM]
            scores = relevance(request.query, [b.content for b in scored], request.method)
            return Change(replace=[b.model_copy(update={"relevance": score})
                                   for b, score in zip(scored, scores, strict=True) if score != b.relevance])

        return await self._rewrite(request.session_id, plan, request.if_version)

    async def dedupe(self, request: SessionRef) -> ChangeReply:
        return await self._rewrite(request.session_id, pruning.duplicates, None)

    async def _rewrite(self, session_id: str, plan: Callable[[Session], Change], expected: int | None) -> ChangeReply:
        """Read, plan a change, commit it against the version read; again if another writer came between."""
        for _ in range(RETRIES):
            session = await self._read(session_id)
            if expected is not None and session.version != expected:
                self._raise_for(Committed("conflict", session.version), session_id, expected)
            change = plan(session)
            committed = await self._commit(session_id, change, session.version)
            if committed.status == "conflict" and expected is None:
                continue
            self._raise_for(committed, session_id, expected)
            return ChangeReply(session_id=session_id, version=committed.version, metrics=committed.metrics,
                               changed=[b.id for b in change.replace], removed=list(change.delete))
        raise VersionConflict(f"session {session_id} kept changing; try again", session_id=session_id)

    # --- render, export, import --------------------------------------------------------------

    async def render(self, request: RenderContext) -> RenderReply:
        session = await self._read(request.session_id)
        settings = RenderSettings(
            budget_tokens=request.budget_tokens,
            recent_share=request.recent_share if request.recent_share is not None else self.config.recent_share,
            min_relevance=request.min_relevance if request.min_relevance is not None else self.config.min_relevance,
        )
        rendered = render(session.blocks, settings)
        return RenderReply(session_id=session.session_id, version=session.version, text=rendered.text,
                           tokens=rendered.tokens, budget_tokens=request.budget_tokens,
                           included=rendered.included, omitted=rendered.omitted)

    async def export(self, request: SessionRef) -> ExportReply:
        session = await self._read(request.session_id)
        await self._emit(EventKind.CTX_EXPORTED, session=session.session_id, detail={
            **_describe(session), "version": session.version})
        return ExportReply(package=SessionPackage(exported_ms=self._clock(), session=session))

    async def import_(self, request: ImportSession) -> SessionReply:
        """A new session of `agent_id` holding every block of the package, ids and token counts kept."""
        package = request.package
        if package.format != PACKAGE_FORMAT or package.tokenizer != TOKENIZER:
            raise InvalidRequest(f"cannot import a {package.format} package counted by {package.tokenizer}; "
                                 f"this store reads {PACKAGE_FORMAT} counted by {TOKENIZER}")
        source = package.session
        blocks = self._recounted(source.blocks)
        created = await self.create(CreateSession(
            agent_id=request.agent_id, session_id=request.session_id, user_id=source.user_id,
            metadata=source.metadata, max_tokens=source.max_tokens, trace_id=source.trace_id))
        assert created.session is not None
        session_id = created.session.session_id
        limits = Limits(ttl_ms=self._limits.ttl_ms, max_blocks=max(self.config.max_blocks, len(blocks)),
                        max_bytes=self.config.max_session_bytes, enforce_capacity=False)
        try:
            self._raise_for(await self._commit(session_id, Change(add=blocks), 0, limits), session_id, 0)
        except ContextError:
            await self.store.delete(session_id)  # no half-imported session is left behind
            raise
        session = await self._read(session_id)
        await self._emit(EventKind.CTX_IMPORTED, session=session_id, detail={
            **_describe(session), "from_session": source.session_id, "from_agent": source.agent_id})
        return SessionReply(session=session)

    def _recounted(self, blocks: Sequence[Block]) -> list[Block]:
        """The package's blocks, token counts checked against this store's tokenizer."""
        counts = count_many([block.content for block in blocks])
        wrong = [b.id for b, n in zip(blocks, counts, strict=True) if b.token_count != n]
        if wrong:
            raise InvalidRequest(f"{len(wrong)} block token counts do not match {TOKENIZER} (first: {wrong[0]})")
        return list(blocks)

    # --- delete, forget, search --------------------------------------------------------------

    async def delete(self, request: SessionRef, reason: str = "delete") -> DeleteReply:
        summary = await self.store.delete(request.session_id)
        if summary is None:
            raise _not_found(request.session_id)
        await self._emit(EventKind.CTX_DELETED, session=request.session_id, detail={
            **_describe(summary), "reason": reason})
        return DeleteReply(deleted=[request.session_id])

    async def forget_user(self, request: ForgetUser) -> DeleteReply:
        """Delete every session of the user; each deletion is an event (ids and counts, never content)."""
        deleted = []
        for session_id in await self.store.sessions_of("user", request.user_id):
            summary = await self.store.delete(session_id)
            if summary is not None:
                await self._emit(EventKind.CTX_DELETED, session=session_id, detail={
                    **_describe(summary), "reason": "forget_user"})
                deleted.append(session_id)
        log.info("ctx.user_forgotten", sessions=len(deleted))
        return DeleteReply(deleted=deleted)

    async def search(self, request: SearchSessions) -> SearchReply:
        """Matching sessions, newest first; index entries of expired sessions are dropped on the way."""
        found: list[SessionSummary] = []
        async for ids in self._candidates(request):
            summaries = await self.store.summaries(ids)
            owners = (request.agent_id, request.user_id)
            stale = [(sid, *owners) for sid, s in zip(ids, summaries, strict=True) if s is None]
            if stale:
                await self.store.forget_index_entries(stale)
            found += [s for s in summaries if s is not None and _matches(s, request)]
            if len(found) >= request.limit:
                break
        found.sort(key=lambda s: (-s.updated_ms, s.session_id))
        return SearchReply(sessions=found[: request.limit])

    async def _candidates(self, request: SearchSessions) -> AsyncIterator[list[str]]:
        """The narrowest index that applies, or every session newest first, page by page."""
        if request.user_id is not None or request.agent_id is not None:
            kind, owner = ("user", request.user_id) if request.user_id is not None else ("agent", request.agent_id)
            yield await self.store.sessions_of(kind, owner or "")
            return
        offset = 0
        while ids := await self.store.recent(offset, SEARCH_PAGE):
            yield ids
            offset += len(ids)


def _not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"no context session {session_id} (never created, deleted or expired)",
                           session_id=session_id)


def _matches(summary: SessionSummary, request: SearchSessions) -> bool:
    return ((request.agent_id is None or summary.agent_id == request.agent_id)
            and (request.user_id is None or summary.user_id == request.user_id)
            and all(summary.metadata.get(k) == v for k, v in request.metadata.items()))


def _describe(summary: SessionSummary) -> dict[str, Any]:
    """What events say about a session: ids and sizes, never its content."""
    return {"session_id": summary.session_id, "agent_id": summary.agent_id, "user": summary.user_id,
            "blocks": summary.metrics.blocks, "tokens": summary.metrics.total_tokens}

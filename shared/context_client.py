"""The context store's SDK: typed requests over `toolbus.ctx.<verb>`, refusals raised as `ContextRefused`.

    async with ToolbusClient(url, key) as client:
        session = await client.context.create("planner", user_id="u-42",
                                              blocks=[NewBlock(type=BlockType.SYSTEM, content="Be brief.")])
        await client.context.append(session.session_id, [NewBlock(type=BlockType.USER, content="Hi")],
                                    if_version=session.version)
        print((await client.context.render(session.session_id, budget_tokens=2000)).text)

A call made with `session=<id>` has its result appended to that session as a TOOL block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from shared.codec import pack, unpack
from shared.contracts.context import (
    AppendBlocks,
    AppendReply,
    ChangeReply,
    ContextReply,
    CreateSession,
    DeleteReply,
    ExportReply,
    ForgetUser,
    ImportSession,
    NewBlock,
    PruneSession,
    RenderContext,
    RenderReply,
    RescoreMethod,
    RescoreSession,
    SearchReply,
    SearchSessions,
    Session,
    SessionPackage,
    SessionRef,
    SessionReply,
    SessionSummary,
)
from shared.errors import ContextRefused, InvalidRequest, first_problem
from shared.subjects import Subjects

ReplyT = TypeVar("ReplyT", bound=ContextReply)
RequestT = TypeVar("RequestT", bound=BaseModel)
DEFAULT_TIMEOUT_S = 10.0


class ContextUnavailable(ConnectionError):
    """No context store answered (none running, or too slow)."""


def _request(model: type[RequestT], **fields: Any) -> RequestT:
    """The request, or `ContextRefused` (-32600 invalid_request) naming the bad field, as the store would."""
    try:
        return model(**fields)
    except ValidationError as error:
        problem = first_problem(error, "request")
        refused = InvalidRequest(f"bad {model.__name__} request: {problem}").error_object()
        raise ContextRefused(refused["code"], refused["message"], refused["data"]) from None


class ContextClient:
    """Requests to whichever context-store replica answers first, on an existing NATS connection."""

    def __init__(self, nc: NatsClient, subjects: Subjects, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._nc = nc
        self._subjects = subjects
        self.timeout_s = timeout_s

    async def _ask(self, verb: str, request: BaseModel, reply_type: type[ReplyT]) -> ReplyT:
        try:
            msg = await self._nc.request(self._subjects.ctx(verb), pack(request), timeout=self.timeout_s)
        except NoRespondersError:
            raise ContextUnavailable("no context store is running (is `context.enabled` off?)") from None
        except NatsTimeoutError:
            raise ContextUnavailable(f"the context store did not answer {verb} within {self.timeout_s}s") from None
        reply = unpack(reply_type, msg.data)
        if reply.error is not None:
            raise ContextRefused(reply.error.code, reply.error.message, reply.error.data)
        return reply

    async def _session(self, verb: str, request: BaseModel) -> Session:
        session = (await self._ask(verb, request, SessionReply)).session
        assert session is not None, "a reply without error carries the session"
        return session

    async def create(self, agent_id: str, *, session_id: str | None = None, user_id: str | None = None,
                     metadata: dict[str, str] | None = None, max_tokens: int | None = None,
                     blocks: Sequence[NewBlock] = (), trace_id: str | None = None) -> Session:
        """A new session of `agent_id` (with its first blocks, if given)."""
        return await self._session("create", _request(
            CreateSession,
            agent_id=agent_id, session_id=session_id, user_id=user_id, metadata=metadata or {},
            max_tokens=max_tokens, blocks=list(blocks), trace_id=trace_id))

    async def append(self, session_id: str, blocks: Sequence[NewBlock], *, if_version: int | None = None
                     ) -> AppendReply:
        """Append blocks; with `if_version`, a stale version raises `ContextRefused` (`current_version`)."""
        request = _request(AppendBlocks, session_id=session_id, blocks=list(blocks), if_version=if_version)
        return await self._ask("append", request, AppendReply)

    async def get(self, session_id: str) -> Session:
        """The whole session, blocks in order (refreshes its TTL)."""
        return await self._session("get", _request(SessionRef, session_id=session_id))

    async def render(self, session_id: str, budget_tokens: int, *, recent_share: float | None = None,
                     min_relevance: float | None = None) -> RenderReply:
        """The session formatted into at most `budget_tokens` tokens."""
        request = _request(RenderContext, session_id=session_id, budget_tokens=budget_tokens,
                           recent_share=recent_share, min_relevance=min_relevance)
        return await self._ask("render", request, RenderReply)

    async def rescore(self, session_id: str, query: str, *, method: RescoreMethod = RescoreMethod.BM25,
                      if_version: int | None = None) -> ChangeReply:
        """Recompute the relevance of every non-SYSTEM block against `query` (docs/context.md has the formulas)."""
        request = _request(RescoreSession, session_id=session_id, query=query, method=method, if_version=if_version)
        return await self._ask("rescore", request, ChangeReply)

    async def prune(self, session_id: str, target_saturation: float | None = None) -> ChangeReply:
        """Drop the least relevant non-SYSTEM blocks until saturation is at most the target (default prune_to)."""
        request = _request(PruneSession, session_id=session_id, target_saturation=target_saturation)
        return await self._ask("prune", request, ChangeReply)

    async def dedupe(self, session_id: str) -> ChangeReply:
        """Remove blocks repeating an earlier block of the same type (whitespace aside)."""
        return await self._ask("dedupe", _request(SessionRef, session_id=session_id), ChangeReply)

    async def export(self, session_id: str) -> SessionPackage:
        """The whole session as a package another agent can import."""
        package = (await self._ask("export", _request(SessionRef, session_id=session_id), ExportReply)).package
        assert package is not None, "a reply without error carries the package"
        return package

    async def import_package(self, package: SessionPackage, agent_id: str, *, session_id: str | None = None
                             ) -> Session:
        """A new session of `agent_id` with every block of `package` (ids and token counts kept)."""
        return await self._session("import", _request(ImportSession, package=package, agent_id=agent_id,
                                                           session_id=session_id))

    async def delete(self, session_id: str) -> None:
        """Delete one session (an unknown one is refused with session_not_found)."""
        await self._ask("delete", _request(SessionRef, session_id=session_id), DeleteReply)

    async def forget_user(self, user_id: str) -> list[str]:
        """Delete every session of a user; the ids deleted."""
        return (await self._ask("forget-user", _request(ForgetUser, user_id=user_id), DeleteReply)).deleted

    async def search(self, *, agent_id: str | None = None, user_id: str | None = None,
                     metadata: dict[str, str] | None = None, limit: int = 100) -> list[SessionSummary]:
        """Sessions matching every criterion given, most recently changed first (no blocks)."""
        request = _request(SearchSessions, agent_id=agent_id, user_id=user_id, metadata=metadata or {}, limit=limit)
        return (await self._ask("search", request, SearchReply)).sessions

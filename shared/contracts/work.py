"""Internal messages between router and executors (msgpack on the bus)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.budget import BudgetHold
from shared.contracts.jsonrpc import RequestId


class WorkItem(BaseModel):
    """A call the router accepted and routed to a pool, on `toolbus.work.<pool>.<prio>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    call_id: str = Field(description="Idempotency key end to end (the producer's Nats-Msg-Id).")
    request_id: RequestId = Field(description="The producer's JSON-RPC id, echoed in the result.")
    method: str = Field(default="tools/call", description="`tools/call`, `resources/read` or `prompts/get`.")
    public_tool: str = Field(description="Public name of the tool, prompt or resource the producer asked for.")
    server: str = Field(description="Backend server name in the config.")
    tool: str = Field(description="What the backend knows it as: tool name, prompt name or resource URI.")
    pool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] | None = Field(default=None, description="The request's MCP _meta.")
    principal: str = Field(description="Principal name (never the key).")
    priority: int = Field(ge=0, le=3)
    deadline_ms: int | None = Field(default=None, description="Epoch ms after which it must not run.")
    reply_to: str | None = None
    session: str | None = None
    accepted_at_ms: int = Field(description="When the router accepted the call (epoch ms).")
    budget: BudgetHold | None = Field(default=None, description="What the accountant holds for it, if anything.")


class Attempt(BaseModel):
    """One failed execution attempt, kept in a dead letter's history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt: int = Field(ge=1)
    worker_id: str
    error: str
    at_ms: int


class DeadLetter(BaseModel):
    """A call whose retries were exhausted, on `toolbus.dlq.<pool>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work: WorkItem
    attempts: list[Attempt]
    dead_at_ms: int

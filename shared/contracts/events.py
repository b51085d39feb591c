"""Lifecycle events on `toolbus.evt.<kind>` (msgpack). Audit and context read these."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventKind(StrEnum):
    """Every event kind of DESIGN.md §5."""

    CALL_ACCEPTED = "call.accepted"  # router authenticated and validated the call
    CALL_REJECTED = "call.rejected"  # router refused it; a JSON-RPC error result was sent
    CALL_DISPATCHED = "call.dispatched"  # published to a pool's work subject
    CALL_STARTED = "call.started"  # a worker began executing it
    CALL_RETRIED = "call.retried"  # a transient failure; it will be redelivered
    CALL_COMPLETED = "call.completed"  # a final MCP result (ok or tool_error) was published
    CALL_FAILED = "call.failed"  # a final JSON-RPC error after dispatch (deadline, cancel)
    CALL_DEAD_LETTERED = "call.dead_lettered"  # retries exhausted; parked in the DLQ
    BREAKER_OPENED = "breaker.opened"  # a backend's breaker opened
    BREAKER_HALF_OPEN = "breaker.half_open"  # a trial call is allowed through
    BREAKER_CLOSED = "breaker.closed"  # the backend is healthy again
    BUDGET_ALERT = "budget.alert"  # a scope crossed an alert threshold
    BUDGET_EXCEEDED = "budget.exceeded"  # a call was refused by a budget
    BUDGET_RESERVED = "budget.reserved"  # ledger: a call's estimated cost was held
    BUDGET_SETTLED = "budget.settled"  # ledger: the hold was replaced by the actual cost
    BUDGET_RELEASED = "budget.released"  # ledger: the hold was freed (failure, or expired)
    BUDGET_LIMIT_SET = "budget.limit_set"  # a runtime limit was set or removed
    BUDGET_REBUILT = "budget.rebuilt"  # spend counters were rebuilt from the ledger
    CTX_BLOCK_ADDED = "ctx.block_added"  # a block was appended to a context session
    CTX_PRUNED = "ctx.pruned"  # blocks were pruned from a session
    CTX_EXPORTED = "ctx.exported"  # a session was exported for handoff
    CTX_IMPORTED = "ctx.imported"  # a session was imported
    CTX_DELETED = "ctx.deleted"  # a session was deleted
    CONFIG_RELOADED = "config.reloaded"  # a new config was published to the registry
    TOOLS_REGISTERED = "tools.registered"  # an executor registered its backends' tools


class CallStatus(StrEnum):
    """Final status of a call, in the result's `Toolbus-Status` header."""

    OK = "ok"  # the tool ran and returned a result
    TOOL_ERROR = "tool_error"  # the tool ran and returned `isError: true`
    REJECTED = "rejected"  # refused before execution
    FAILED = "failed"  # could not be executed (dead-lettered, cancelled, internal)
    TIMEOUT = "timeout"  # its deadline or the pool timeout passed


class Event(BaseModel):
    """One lifecycle event; fields that do not apply are null."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: EventKind
    ts_ms: int = Field(description="When it happened (epoch ms).")
    source: str = Field(description="Emitting service instance, e.g. `router` or `executor:git:1`.")
    call_id: str | None = None
    principal: str | None = Field(default=None, description="Principal name, never the key.")
    tool: str | None = None
    pool: str | None = None
    trace_id: str | None = None
    session: str | None = Field(default=None, description="Context session (Toolbus-Session) the call belongs to.")
    status: CallStatus | None = None
    reason: str | None = Field(default=None, description="Error reason for refusals and failures.")
    attempt: int | None = None
    duration_ms: float | None = None
    cost_micros: int | None = Field(default=None, description="Money moved by a budget event (micro-USD).")
    buckets: list[str] = Field(default_factory=list, description="Budget counters touched: `<scope>:<window key>`.")
    risk: int | None = Field(default=None, description="Injection risk score 0..100 the router gave the call.")
    arguments: Any = Field(default=None, description="The call's arguments, secret-like fields redacted.")
    arguments_sha256: str | None = Field(default=None, description="SHA-256 of the arguments' RFC 8785 JSON.")
    result_bytes: int | None = Field(default=None, description="Size of the published result.")
    result_sha256: str | None = Field(default=None, description="SHA-256 of the published result.")
    detail: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

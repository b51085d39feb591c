"""The budget accountant's request-reply API on `toolbus.budget.<verb>` (msgpack).

Money is always integer micro-USD (`*_micros`); a float never carries an amount.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(extra="forbid", frozen=True)

Window = Literal["day", "month", "total"]


class HoldState(StrEnum):
    """Where one call's hold is in its life."""

    HELD = "held"  # reserved, waiting for the call to finish
    SETTLED = "settled"  # replaced by the actual cost
    RELEASED = "released"  # freed: the call failed or was refused after routing
    EXPIRED = "expired"  # freed by the reaper: nobody settled it in time
    NONE = "none"  # no budget applies to the call, nothing is held


class RefusalReason(StrEnum):
    """Why the accountant said no."""

    BUDGET_EXCEEDED = "budget_exceeded"  # a scope's spend limit would be crossed
    RATE_LIMITED = "rate_limited"  # a scope's rpm or tpm is used up
    UNAVAILABLE = "unavailable"  # Redis failed or lost its data: fail closed


class BudgetHold(BaseModel):
    """What the router reserved for a call, carried in its work item."""

    model_config = _FROZEN

    hold_micros: int = Field(ge=0, description="Amount held on every applicable scope.")
    max_tokens: int | None = Field(default=None, description="Tokens the hold pays for (token-priced tools).")
    expires_at_ms: int = Field(description="The reaper frees the hold after this; the call must end before it.")


class TokenUsage(BaseModel):
    """Token usage a tool reported in its result's `_meta.usage`."""

    model_config = _FROZEN

    model: str | None = None
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class ReserveRequest(BaseModel):
    """Hold the estimated cost of a call on every scope of its principal (all or none)."""

    model_config = _FROZEN

    call_id: str
    principal: str
    scopes: list[str] = Field(description="The principal's scopes, widest first: org, team, project, user, key.")
    tools: list[str] = Field(min_length=1, description="The tool asked for, then a cheaper economy alternative.")
    start_by_ms: int = Field(description="Latest start of the call (its deadline, or now + hold TTL).")
    run_ms: int = Field(ge=0, description="The longest the call may run once started (its pool timeout).")


class Refusal(BaseModel):
    """Why a reserve was refused; `scope` names the limit that said no."""

    model_config = _FROZEN

    reason: RefusalReason
    message: str
    scope: str | None = None
    retry_after_ms: int | None = None


class ReserveReply(BaseModel):
    """The accountant's answer: a hold (possibly of nothing), or a refusal."""

    model_config = _FROZEN

    call_id: str
    tool: str | None = Field(default=None, description="The tool the hold is for (may be the economy one).")
    hold: BudgetHold | None = None
    state: HoldState = HoldState.NONE
    refusal: Refusal | None = None


class SettleRequest(BaseModel):
    """Replace a call's hold by its actual cost."""

    model_config = _FROZEN

    call_id: str
    tool: str
    usage: TokenUsage | None = None


class ReleaseRequest(BaseModel):
    """Free a call's hold: it failed or was refused, so it cost nothing."""

    model_config = _FROZEN

    call_id: str
    reason: str


class LedgerReply(BaseModel):
    """What a settle or release did; `changed` is False for a repeat or an unknown hold."""

    model_config = _FROZEN

    call_id: str
    state: HoldState
    changed: bool
    actual_micros: int = 0
    overrun_micros: int = Field(default=0, description="Actual cost above the hold, recorded as spend.")
    late: bool = Field(default=False, description="Settled after the hold was freed (still recorded as spend).")
    error: str | None = None


class StatusRequest(BaseModel):
    """Budgets to show: one scope, or all of them."""

    model_config = _FROZEN

    scope: str | None = None


class ScopeBudget(BaseModel):
    """One limit of one scope in its current window."""

    model_config = _FROZEN

    scope: str
    window: Window | None = Field(description="None for a scope with only rate limits.")
    window_key: str | None = None
    resets_at_ms: int | None = Field(default=None, description="Start of the next window; None for `total`.")
    limit_micros: int | None = None
    spent_micros: int = 0
    held_micros: int = 0
    remaining_micros: int | None = None
    overrun_micros: int = 0
    late_micros: int = 0
    by_tool: dict[str, int] = Field(default_factory=dict)
    by_model: dict[str, int] = Field(default_factory=dict)
    alert_at: list[float] = Field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    source: Literal["config", "runtime"] = "config"


class StatusReply(BaseModel):
    """Every requested budget; `counters_ok` is False while Redis needs a rebuild."""

    model_config = _FROZEN

    budgets: list[ScopeBudget] = Field(default_factory=list)
    counters_ok: bool = True
    error: str | None = None


class SetLimitRequest(BaseModel):
    """Set (or with `limit_micros` None, remove) a runtime spend limit of one scope and window."""

    model_config = _FROZEN

    scope: str
    window: Window = "day"
    limit_micros: int | None = Field(default=None, ge=0)
    alert_at: list[float] = Field(default_factory=list)


class RebuildRequest(BaseModel):
    """Rebuild every spend counter and open hold from the budget ledger in EVENTS."""

    model_config = _FROZEN


class AdminReply(BaseModel):
    """Outcome of `set` and `rebuild`."""

    model_config = _FROZEN

    ok: bool
    message: str
    calls: int = Field(default=0, description="Calls folded from the ledger (rebuild).")
    held_micros: int = 0
    spent_micros: int = 0

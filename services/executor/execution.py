"""What an attempt's outcome means: final result, retry with backoff, or dead letter."""

from __future__ import annotations

import random
from typing import Any

from mcp_types import CallToolResult, GetPromptResult, ReadResourceResult

from shared.config import BackoffConfig
from shared.contracts import CallStatus, ToolCallResponse, WorkItem
from shared.outcomes import now_ms


def backoff_delay(attempt: int, backoff: BackoffConfig, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max_s, base_s * 2^(attempt-1))]."""
    doublings = min(max(0, attempt - 1), 64)  # beyond 2^64 any sane max_s has long been reached
    ceiling = min(backoff.max_s, backoff.base_s * 2.0**doublings)
    return (rng or random).uniform(0, ceiling)


def mcp_result(result: CallToolResult | ReadResourceResult | GetPromptResult) -> dict[str, Any]:
    """The backend's result exactly as MCP puts it on the wire (camelCase, no nulls)."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def success_response(
    work: WorkItem, result: CallToolResult | ReadResourceResult | GetPromptResult
) -> tuple[ToolCallResponse, CallStatus]:
    """The producer's response for a request that ran; a tool's own `isError` makes it `tool_error`."""
    status = CallStatus.TOOL_ERROR if isinstance(result, CallToolResult) and result.is_error else CallStatus.OK
    return ToolCallResponse(id=work.request_id, result=mcp_result(result)), status


def remaining_s(work: WorkItem) -> float | None:
    """Seconds left before the call's deadline (negative once passed), None without one."""
    return None if work.deadline_ms is None else (work.deadline_ms - now_ms()) / 1000


def hold_left_s(work: WorkItem, margin_s: float) -> float | None:
    """Seconds the call may still run on its budget hold (ending `margin_s` before the hold
    expires, so the settlement lands first); None without a hold."""
    if work.budget is None:
        return None
    return (work.budget.expires_at_ms - now_ms()) / 1000 - margin_s


def time_budget_s(work: WorkItem, pool_timeout_s: float, hold_margin_s: float = 0.0) -> tuple[float, bool]:
    """How long this attempt may run, and whether that limit is final (the call's own deadline
    or the end of its budget hold) rather than the retryable pool timeout."""
    limits = [left for left in (remaining_s(work), hold_left_s(work, hold_margin_s)) if left is not None]
    tightest = min(limits, default=None)
    if tightest is not None and tightest < pool_timeout_s:
        return max(tightest, 0.0), True
    return pool_timeout_s, False


def final_limit(work: WorkItem, hold_margin_s: float) -> str:
    """Which final limit binds the call: `deadline` or `budget hold`."""
    deadline, hold = remaining_s(work), hold_left_s(work, hold_margin_s)
    return "budget hold" if hold is not None and (deadline is None or hold < deadline) else "deadline"

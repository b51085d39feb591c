"""Where a call's cost is settled: after it ran, before its result is published.

A call that ran (`ok` or `tool_error`) is settled with its actual cost: the accountant prices
the tool and the `_meta.usage` tokens the result reports. Any other end (refused at the
worker, deadline, cancelled, dead-lettered) releases the hold. Both are idempotent at the
accountant, so retrying them is safe; if the accountant stays away the hold expires and the
reaper frees it, and the ledger event (if any) is reconciled by `toolbus budget rebuild`.
"""

from __future__ import annotations

import asyncio

import structlog
from pydantic import ValidationError

from shared.budget_client import AccountantUnavailable, BudgetClient
from shared.contracts import (
    CallStatus,
    LedgerReply,
    ReleaseRequest,
    SettleRequest,
    TokenUsage,
    ToolCallResponse,
    WorkItem,
)

log = structlog.get_logger(__name__)

SETTLE_FOR_S = 5.0  # how long a worker keeps trying before it leaves the hold to the reaper
MAX_TOKENS_META = "io.toolbus/max_tokens"  # tells a token-priced tool how many tokens its hold pays for


def usage_of(response: ToolCallResponse) -> TokenUsage | None:
    """The token usage a tool reported in its result's `_meta.usage`, if readable."""
    meta = (response.result or {}).get("_meta")
    usage = meta.get("usage") if isinstance(meta, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        return TokenUsage.model_validate({k: v for k, v in usage.items() if k in TokenUsage.model_fields})
    except ValidationError:
        log.warning("budget.bad_usage", usage=str(usage)[:200])
        return None


async def settle_call(client: BudgetClient, work: WorkItem, response: ToolCallResponse, status: CallStatus) -> None:
    """Settle (the tool ran) or release (it did not) the call's hold, retrying for a few seconds."""
    if work.budget is None:
        return
    ran = status in (CallStatus.OK, CallStatus.TOOL_ERROR)
    reason = status.value if response.error is None else response.error.data.reason

    async def once() -> LedgerReply:
        if ran:
            return await client.settle(SettleRequest(call_id=work.call_id, tool=work.public_tool,
                                                     usage=usage_of(response)))
        return await client.release(ReleaseRequest(call_id=work.call_id, reason=reason))

    delay = 0.05
    try:
        async with asyncio.timeout(SETTLE_FOR_S):
            while True:
                try:
                    reply = await once()
                except AccountantUnavailable as error:
                    log.warning("budget.settle_retrying", error=str(error))
                else:
                    if reply.error is None:
                        return
                    log.warning("budget.settle_retrying", error=reply.error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
    except TimeoutError:
        log.error("budget.settle_gave_up", ran=ran, hold_micros=work.budget.hold_micros)

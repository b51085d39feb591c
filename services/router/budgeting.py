"""Where a call is budgeted: the router's last check, a reserve at the budget accountant.

The accountant holds the call's estimated cost on every scope of its principal, or refuses;
it may also pick the tool's cheaper economy alternative when a scope's budget runs low (the
work item is then re-pointed at that tool). If the accountant cannot be reached the call is
refused (fail closed): no call reaches a backend unbudgeted.
"""

from __future__ import annotations

from services.router.decision import Decision
from shared.budget_client import AccountantUnavailable, BudgetClient
from shared.config import Config
from shared.contracts import RefusalReason, ReserveReply, ReserveRequest, WorkItem
from shared.errors import BudgetExceeded, RateLimited, ToolbusError
from shared.outcomes import now_ms

UNAVAILABLE_RETRY_MS = 1000


async def reserve_budget(client: BudgetClient, config: Config, decision: Decision) -> None:
    """Reserve the routed call's cost: on refusal the decision becomes a refusal, else its work
    item carries the hold (and, for an economy pick, the cheaper tool)."""
    work = decision.work
    assert work is not None
    try:
        reply = await client.reserve(_reserve_request(config, decision, work))
    except AccountantUnavailable as error:
        message = f"budget accounting unavailable ({error}); the call was refused so nothing runs unbudgeted"
        decision.work, decision.refusal = None, _unavailable(message)
        return
    if reply.refusal is not None:
        decision.work, decision.refusal = None, _refusal(reply)
        return
    decision.work = _with_hold(work, reply, decision)


def _reserve_request(config: Config, decision: Decision, work: WorkItem) -> ReserveRequest:
    pools = {work.pool} | ({decision.economy.pool} if decision.economy else set())
    run_s = max(config.pools[pool].timeout_s for pool in pools if pool in config.pools)
    start_by = work.deadline_ms or now_ms() + int(config.accounting.hold_ttl_s * 1000)
    tools = [work.public_tool] + ([decision.economy.public_name] if decision.economy else [])
    return ReserveRequest(call_id=work.call_id, principal=work.principal, scopes=decision.scopes, tools=tools,
                          start_by_ms=start_by, run_ms=int(run_s * 1000))


def _with_hold(work: WorkItem, reply: ReserveReply, decision: Decision) -> WorkItem:
    update: dict[str, object] = {"budget": reply.hold}
    economy = decision.economy
    if economy is not None and reply.tool == economy.public_name:
        update |= {"public_tool": economy.public_name, "server": economy.server, "tool": economy.tool,
                   "pool": economy.pool}
    return work.model_copy(update=update)


def _refusal(reply: ReserveReply) -> ToolbusError:
    refusal = reply.refusal
    assert refusal is not None
    if refusal.reason is RefusalReason.RATE_LIMITED:
        return RateLimited(refusal.message, scope=refusal.scope, retry_after_ms=refusal.retry_after_ms)
    if refusal.reason is RefusalReason.UNAVAILABLE:
        return _unavailable(refusal.message)
    return BudgetExceeded(refusal.message, scope=refusal.scope)


def _unavailable(message: str) -> ToolbusError:
    return BudgetExceeded(message, scope=None, unavailable=True, retry_after_ms=UNAVAILABLE_RETRY_MS)

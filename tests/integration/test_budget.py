"""Budgets through the whole mesh: concurrent calls never overspend, every scope of the hierarchy
refuses on its own, rate limits refuse with retry_after_ms, token-priced tools settle their usage,
and the economy tool is picked when a budget runs low.

Each test uses principals of its own (scopes are never shared between tests), and the module
has its own key prefix, so counters in the session's Redis never leak between modules.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio

from shared.budget_client import BudgetClient
from shared.client import CallResult, ToolbusClient
from shared.config import Config, hash_api_key, parse_config
from shared.contracts import ScopeBudget, StatusRequest
from shared.embedded import NatsServer, RedisServer
from shared.status import collect_status
from shared.subjects import Subjects
from tests.helpers import InProcessMesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PREFIX = f"bud{uuid.uuid4().hex[:8]}"
CENT = 10_000  # micro-USD
USERS = {  # principal → (org, team, user scope name)
    "spender": ("acme", "many", "spender"),
    "dana": ("acme", "data", "dana"),
    "eli": ("acme", "data", "eli"),
    "fay": ("acme", "ops", "fay"),
    "rate": ("acme", "rates", "rate"),
    "tokens": ("acme", "tok", "tokens"),
    "thrift": ("acme", "thrift", "thrift"),
    "free": ("acme", "free", "free"),
}


def key_of(name: str) -> str:
    return f"key-{name}-{PREFIX}"


def budget_config() -> Config:
    demo = {"command": sys.executable, "args": ["-m", "services.demo_tools"]}
    principals = [
        {"name": name, "key_sha256": hash_api_key(key_of(name)), "roles": ["user"],
         "scope": {"org": org, "team": team, "user": user}}
        for name, (org, team, user) in USERS.items()
    ]
    return parse_config({
        "prefix": PREFIX,
        "servers": {"demo": demo, "cheap": demo, "cheapest": {**demo, "pool": "cheap"}},
        "pools": {"default": {"concurrency": 64, "timeout_s": 20}, "cheap": {"concurrency": 8}},
        "principals": principals,
        "roles": {"user": {"allow": ["*"]}},
        "tools": {
            "demo__echo": {"cost_usd": "0.01"},
            "cheap__echo": {"cost_usd": "0.05", "economy": "cheapest__echo"},
            "cheapest__echo": {"cost_usd": "0.01"},
            "demo__summarize": {"cost_usd": "0.001", "model": "words-1", "max_tokens": 5},
        },
        "models": {"words-1": {"input_usd_per_mtok": 100, "output_usd_per_mtok": 1000}},
        "budgets": [
            {"scope": "user:spender", "limit_usd": "1.00", "window": "day"},
            {"scope": "org:acme", "limit_usd": 1000, "window": "month"},
            {"scope": "team:data", "limit_usd": "0.03", "window": "day"},
            {"scope": "user:dana", "limit_usd": 1, "window": "day"},
            {"scope": "user:fay", "limit_usd": "0.02", "window": "total"},
            {"scope": "team:ops", "limit_usd": 1, "window": "day"},
            {"scope": "key:rate", "rpm": 3},
            {"scope": "user:tokens", "limit_usd": 1, "window": "day"},
            {"scope": "user:thrift", "limit_usd": "0.20", "window": "day"},
            {"scope": "user:free", "limit_usd": "0.01", "window": "day"},
        ],
        "accounting": {"economy_below": 0.5},
    }, source="<budget tests>")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def budget_mesh(nats_server: NatsServer, redis_server: RedisServer) -> AsyncIterator[InProcessMesh]:
    async with InProcessMesh(nats_server.url, budget_config(), redis_server.url) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def accountant(budget_mesh: InProcessMesh) -> AsyncIterator[BudgetClient]:
    nc = await nats.connect(budget_mesh.nats_url)
    yield BudgetClient(nc, Subjects(PREFIX))
    await nc.close()


async def call_as(mesh: InProcessMesh, name: str, tool: str, count: int = 1,
                  args: dict[str, Any] | None = None) -> list[CallResult]:
    args = {"text": "hi"} if args is None else args
    async with ToolbusClient(mesh.nats_url, api_key=key_of(name), prefix=PREFIX) as client:
        calls = (client.call(tool, args, timeout_s=60, raise_on_error=False) for _ in range(count))
        return list(await asyncio.gather(*calls))


def error_of(result: CallResult) -> dict[str, Any]:
    """The JSON-RPC error of a refused call as the producer receives it."""
    assert result.response.error is not None, result
    return result.response.error.model_dump(mode="json")


async def budget_of(accountant: BudgetClient, scope: str) -> ScopeBudget:
    reply = await accountant.status(StatusRequest(scope=scope))
    assert len(reply.budgets) == 1, reply
    return reply.budgets[0]


async def test_concurrent_calls_never_overspend_a_budget(budget_mesh: InProcessMesh, accountant: BudgetClient) -> None:
    """300 concurrent calls of a $0.01 tool against $1.00: exactly 100 run, 200 are refused naming the scope."""
    results = await call_as(budget_mesh, "spender", "demo__echo", count=300)
    ok = [r for r in results if r.status == "ok"]
    refused = [error_of(r) for r in results if r.response.error is not None]
    assert len(ok) == 100
    assert len(refused) == 200
    assert {e["code"] for e in refused} == {-32010}
    assert {e["data"]["scope"] for e in refused} == {"user:spender"}
    budget = await budget_of(accountant, "user:spender")
    assert (budget.spent_micros, budget.held_micros, budget.remaining_micros) == (100 * CENT, 0, 0)
    assert budget.by_tool == {"demo__echo": 100 * CENT}


async def test_a_team_limit_refuses_while_user_and_org_have_room(budget_mesh: InProcessMesh,
                                                                  accountant: BudgetClient) -> None:
    """Two users of team `data` share its $0.03: the fourth call is refused by the team, not the user."""
    first = await call_as(budget_mesh, "dana", "demo__echo", count=2)
    second = await call_as(budget_mesh, "eli", "demo__echo")
    assert [r.status for r in [*first, *second]] == ["ok", "ok", "ok"]
    [refused] = await call_as(budget_mesh, "dana", "demo__echo")
    assert error_of(refused)["code"] == -32010
    assert error_of(refused)["data"]["scope"] == "team:data"
    assert (await budget_of(accountant, "user:dana")).remaining_micros == 100 * CENT - 2 * CENT


async def test_a_user_limit_refuses_while_team_and_org_have_room(budget_mesh: InProcessMesh,
                                                                  accountant: BudgetClient) -> None:
    """A user's own $0.02 total refuses the third call though the team's and org's budgets have room."""
    results = await call_as(budget_mesh, "fay", "demo__echo", count=3)
    assert sorted(r.status for r in results) == ["ok", "ok", "rejected"]
    [refused] = [error_of(r) for r in results if r.response.error is not None]
    assert refused["data"]["scope"] == "user:fay"
    team = await budget_of(accountant, "team:ops")
    assert team.spent_micros == 2 * CENT
    assert team.remaining_micros == 98 * CENT


async def test_requests_per_minute_are_limited_with_retry_after(budget_mesh: InProcessMesh) -> None:
    """A key limited to 3 rpm gets its fourth call in the minute refused with -32029 and retry_after_ms."""
    results = [*(await call_as(budget_mesh, "rate", "demo__echo", count=3)),
               *(await call_as(budget_mesh, "rate", "demo__echo"))]
    assert [r.status for r in results] == ["ok", "ok", "ok", "rejected"]
    error = error_of(results[-1])
    assert error["code"] == -32029
    assert error["data"]["scope"] == "key:rate"
    assert 0 < error["data"]["retry_after_ms"] <= 60_000


async def test_token_priced_tools_settle_their_usage_and_flag_overruns(budget_mesh: InProcessMesh,
                                                                       accountant: BudgetClient) -> None:
    """The hold pays for 5 tokens; the tool is told so and stops there; input beyond the hold is an overrun."""
    [short] = await call_as(budget_mesh, "tokens", "demo__summarize", args={"text": "one two three"})
    assert short.text == "one two three"  # 3 in, 3 out: 1000 + 300 + 3000 micro-USD, inside the 6000 held
    [long] = await call_as(budget_mesh, "tokens", "demo__summarize",
                          args={"text": " ".join(["w"] * 20), "max_words": 12})
    assert long.text.split()[:6] == ["w", "w", "w", "w", "w", "…"]  # capped at the hold's 5 tokens
    budget = await budget_of(accountant, "user:tokens")
    long_cost = 1000 + 20 * 100 + 5 * 1000  # 8000 against a 6000 hold
    assert budget.spent_micros == 4300 + long_cost
    assert budget.overrun_micros == long_cost - 6000
    assert budget.by_model == {"words-1": 4300 + long_cost}
    assert budget.held_micros == 0


async def test_a_low_budget_routes_to_the_economy_tool(budget_mesh: InProcessMesh, accountant: BudgetClient) -> None:
    """Under half of $0.20 left, calls of `cheap__echo` ($0.05) go to `cheapest__echo` ($0.01) in pool `cheap`."""
    results = [r for _ in range(5) for r in await call_as(budget_mesh, "thrift", "cheap__echo")]
    assert [r.status for r in results] == ["ok"] * 5
    budget = await budget_of(accountant, "user:thrift")
    # 1.0, 0.75 and 0.5 left (not under half): the dear tool; then 0.25 and 0.20 left: the economy tool.
    assert budget.by_tool == {"cheap__echo": 15 * CENT, "cheapest__echo": 2 * CENT}
    assert budget.spent_micros == 17 * CENT


async def test_free_tools_of_a_budgeted_principal_settle_at_zero(budget_mesh: InProcessMesh,
                                                                  accountant: BudgetClient) -> None:
    """A tool with no price holds and settles nothing: its hold ends `settled`, the budget is untouched."""
    [result] = await call_as(budget_mesh, "free", "demo__pid", args={})
    assert result.status == "ok"
    assert budget_mesh.budget is not None and budget_mesh.budget.ops is not None
    hold = await budget_mesh.budget.ops.accountant.hold(result.call_id)
    assert (hold["state"], hold["amount"], hold["actual"]) == ("settled", "0", "0")
    budget = await budget_of(accountant, "user:free")
    assert (budget.spent_micros, budget.held_micros) == (0, 0)


async def test_mesh_status_reports_spend_per_budget(budget_mesh: InProcessMesh) -> None:
    """`toolbus status` carries every budget's spend next to the pools."""
    nc = await nats.connect(budget_mesh.nats_url)
    try:
        status = await collect_status(nc, Subjects(PREFIX))
    finally:
        await nc.close()
    assert status.budgets_ok is True
    spend = {(b.scope, b.window): b.spent_micros for b in status.budgets}
    assert spend[("user:fay", "total")] == 2 * CENT
    assert ("key:rate", None) in spend  # a scope with only a rate limit is listed too

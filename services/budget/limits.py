"""Which limits apply to a call: config budgets, overridden by limits set at runtime.

Runtime limits (`toolbus budget set`) live in the registry KV bucket under `budget.limits`, so
they survive restarts of every process and of Redis; Redis only ever holds counters.
A runtime limit replaces the config limit of the same scope and window; one with no amount
removes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.budget.pricing import usd_to_micros
from shared.config import BudgetConfig
from shared.contracts.budget import SetLimitRequest, Window
from shared.registry import BUDGET_LIMITS_KEY, parse_budget_limits


@dataclass(frozen=True)
class SpendLimit:
    """A spend limit of one scope over one window."""

    scope: str
    window: Window
    limit_micros: int
    alert_at: tuple[float, ...] = ()
    source: str = "config"

    def thresholds(self) -> list[tuple[str, int]]:
        """Each alert threshold as (label, spend in micro-USD at which it fires)."""
        return [(str(f), int((Decimal(str(f)) * self.limit_micros).to_integral_value(rounding=ROUND_CEILING)))
                for f in self.alert_at]


@dataclass(frozen=True)
class RateLimit:
    """Requests and tokens per minute allowed to one scope."""

    scope: str
    rpm: int | None
    tpm: int | None


class LimitBook:
    """Every limit in force, looked up by a call's scopes."""

    def __init__(self, budgets: list[BudgetConfig], overrides: list[SetLimitRequest]) -> None:
        self.spend: dict[tuple[str, str], SpendLimit] = {
            (b.scope, b.window): SpendLimit(b.scope, b.window, usd_to_micros(b.limit_usd), tuple(b.alert_at))
            for b in budgets if b.limit_usd is not None
        }
        for override in overrides:
            self.spend.pop((override.scope, override.window), None)
            if override.limit_micros is not None:
                self.spend[(override.scope, override.window)] = SpendLimit(
                    override.scope, override.window, override.limit_micros, tuple(override.alert_at), "runtime")
        self.rates = {b.scope: RateLimit(b.scope, b.rpm, b.tpm) for b in budgets if b.rpm or b.tpm}
        self.overrides = overrides

    def spend_limits(self, scopes: list[str]) -> list[SpendLimit]:
        """The spend limits of these scopes, in scope order (widest first)."""
        wanted = set(scopes)
        found = [limit for limit in self.spend.values() if limit.scope in wanted]
        return sorted(found, key=lambda limit: (scopes.index(limit.scope), limit.window))

    def rate_limits(self, scopes: list[str]) -> list[RateLimit]:
        return [self.rates[scope] for scope in scopes if scope in self.rates]


async def load_overrides(kv: KeyValue) -> list[SetLimitRequest]:
    """The runtime limits stored in the registry (none if never set)."""
    try:
        entry = await kv.get(BUDGET_LIMITS_KEY)
    except KeyNotFoundError:
        return []
    return parse_budget_limits(entry.value)


async def store_override(kv: KeyValue, request: SetLimitRequest) -> list[SetLimitRequest]:
    """Add or replace one runtime limit, with compare-and-set so concurrent setters never lose one."""
    while True:
        try:
            entry = await kv.get(BUDGET_LIMITS_KEY)
            revision: int | None = entry.revision
            current = parse_budget_limits(entry.value)
        except KeyNotFoundError:
            revision, current = None, []
        kept = [o for o in current if (o.scope, o.window) != (request.scope, request.window)]
        payload = json.dumps([o.model_dump(mode="json") for o in [*kept, request]]).encode()
        try:
            await (kv.create(BUDGET_LIMITS_KEY, payload) if revision is None else
                   kv.update(BUDGET_LIMITS_KEY, payload, last=revision))
        except KeyWrongLastSequenceError:
            continue  # a concurrent setter won: read its version and apply ours on top
        return [*kept, request]

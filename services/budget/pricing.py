"""What a call may cost (its hold) and what it did cost (its settlement), in integer micro-USD.

Prices come from config as Decimal USD and are converted once, rounding up: a hold is never
smaller than the price, and a settled cost never loses a fraction of a micro-dollar to float
arithmetic. A model's price per million tokens in USD is exactly its price per token in
micro-USD, so token costs are `tokens * price` with no scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from shared.config import Config, ModelPrice, ToolConfig
from shared.contracts.budget import TokenUsage

MICROS_PER_USD = 1_000_000
NO_PRICE = ToolConfig()


def usd_to_micros(usd: Decimal) -> int:
    """USD as integer micro-USD, rounded up to the next micro-dollar."""
    return int((usd * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Estimate:
    """The hold for one call of a tool, and the tokens that hold pays for (token-priced tools)."""

    hold_micros: int
    max_tokens: int | None = None


def estimate(config: Config, tool: str) -> Estimate:
    """The hold for a call of `tool`: its `max_cost_usd`, else its price plus `max_tokens` at the
    dearer of its model's token prices, else its `cost_usd`, else nothing."""
    priced = config.tools.get(tool, NO_PRICE)
    base = usd_to_micros(priced.cost_usd or Decimal(0))
    model = config.models.get(priced.model) if priced.model else None
    if model is None:
        most = priced.max_cost_usd if priced.max_cost_usd is not None else priced.cost_usd
        return Estimate(usd_to_micros(most or Decimal(0)))
    per_token = max(model.input_usd_per_mtok, model.output_usd_per_mtok)
    if priced.max_cost_usd is not None:
        hold = usd_to_micros(priced.max_cost_usd)
        return Estimate(hold, _tokens_affordable(hold - base, per_token, priced.max_tokens))
    tokens = priced.max_tokens or 0
    return Estimate(base + int((tokens * per_token).to_integral_value(rounding=ROUND_CEILING)), tokens)


def _tokens_affordable(micros: int, per_token: Decimal, cap: int | None) -> int:
    if per_token <= 0:
        return cap or 0
    affordable = int((Decimal(max(micros, 0)) / per_token).to_integral_value(rounding=ROUND_FLOOR))
    return affordable if cap is None else min(affordable, cap)


def actual_cost(config: Config, tool: str, usage: TokenUsage | None) -> tuple[int, str | None]:
    """What a finished call cost: `cost_usd` plus its reported tokens, and the model that priced them.

    The usage's own model is priced if the table knows it, else the tool's configured model;
    tokens of a model nobody priced cost nothing (and the model is returned as None).
    """
    priced = config.tools.get(tool, NO_PRICE)
    base = usd_to_micros(priced.cost_usd or Decimal(0))
    if usage is None:
        return base, None
    name = usage.model if usage.model in config.models else priced.model
    model = config.models.get(name) if name else None
    if model is None:
        return base, None
    return base + token_cost(model, usage), name


def token_cost(model: ModelPrice, usage: TokenUsage) -> int:
    """Micro-USD for the usage's tokens at the model's prices, rounded up."""
    exact = usage.input_tokens * model.input_usd_per_mtok + usage.output_tokens * model.output_usd_per_mtok
    return int(exact.to_integral_value(rounding=ROUND_CEILING))

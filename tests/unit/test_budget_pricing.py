"""Budget arithmetic without servers: USD to micro-USD, holds, actual costs, and budget windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.budget.pricing import Estimate, actual_cost, estimate, usd_to_micros
from services.budget.windows import resets_at_ms, window_key
from shared.config import Config, parse_config
from shared.contracts.budget import TokenUsage, Window

pytestmark = [pytest.mark.unit]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> int:
    """Epoch milliseconds of a UTC moment."""
    return (datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


def config(tools: dict[str, Any], models: dict[str, Any] | None = None) -> Config:
    return parse_config({"tools": tools, "models": models or {}}, source="<pricing tests>")


PRICED = config(
    tools={
        "flat": {"cost_usd": "0.01"},
        "capped": {"cost_usd": "0.01", "max_cost_usd": "0.05"},
        "only_max": {"max_cost_usd": "0.0000005"},
        "tokens": {"cost_usd": "0.001", "model": "words-1", "max_tokens": 5},
        "fractional": {"model": "cheap-1", "max_tokens": 1001},
        "budgeted": {"cost_usd": "0.001", "model": "words-1", "max_cost_usd": "0.01"},
        "budgeted_fractional": {"model": "cheap-1", "max_cost_usd": "0.01"},
        "budgeted_capped": {"model": "cheap-1", "max_cost_usd": "0.01", "max_tokens": 500},
        "free_model": {"model": "free-1", "max_cost_usd": "0.02", "max_tokens": 40},
    },
    models={
        "words-1": {"input_usd_per_mtok": 100, "output_usd_per_mtok": 1000},
        "cheap-1": {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.7"},
        "free-1": {},
    },
)


# --------------------------------------------------------------------------- usd_to_micros


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        ("0", 0),
        ("0.01", 10_000),
        ("1.23", 1_230_000),
        ("0.000001", 1),
        ("0.0000001", 1),
        ("0.0000010000000001", 2),
        ("0.0000011", 2),
        ("12345678.9", 12_345_678_900_000),
        ("0.1", 100_000),
    ],
)
def test_usd_to_micros_rounds_up_to_the_next_micro_dollar(usd: str, micros: int) -> None:
    """USD becomes integer micro-USD, any fraction of a micro-dollar rounding up, never down."""
    assert usd_to_micros(Decimal(usd)) == micros


def test_usd_to_micros_is_exact_where_float_arithmetic_is_not() -> None:
    """0.1 + 0.2 USD is exactly 300000 micro-USD (as a float product it would be 300000.00000000006, rounded up)."""
    assert (0.1 + 0.2) * 1_000_000 > 300_000  # the float trap the Decimal arithmetic avoids
    assert usd_to_micros(Decimal("0.1") + Decimal("0.2")) == 300_000
    assert usd_to_micros(Decimal("0.3")) == 300_000


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_whole_micro_dollars_survive_a_round_trip(micros: int) -> None:
    """A whole number of micro-dollars, expressed as Decimal USD, converts back to itself."""
    assert usd_to_micros(Decimal(micros) / 10**6) == micros


# --------------------------------------------------------------------------- estimate


def test_a_flat_priced_tool_holds_its_cost() -> None:
    """A tool with only cost_usd holds exactly that, with no token allowance."""
    assert estimate(PRICED, "flat") == Estimate(10_000, None)


def test_max_cost_usd_is_held_instead_of_cost_usd() -> None:
    """A tool with max_cost_usd holds that maximum (rounded up), not its per-call price."""
    assert estimate(PRICED, "capped") == Estimate(50_000, None)
    assert estimate(PRICED, "only_max") == Estimate(1, None)


def test_an_unpriced_tool_holds_nothing() -> None:
    """A tool missing from the price table holds 0."""
    assert estimate(PRICED, "unknown__tool") == Estimate(0, None)


def test_a_token_priced_tool_holds_its_cost_plus_max_tokens_at_the_dearer_price() -> None:
    """cost_usd plus max_tokens at the dearer of input/output price: 1000 + 5 * 1000 micro-USD for 5 tokens."""
    assert estimate(PRICED, "tokens") == Estimate(6_000, 5)


def test_a_fractional_token_price_rounds_the_hold_up() -> None:
    """1001 tokens at 0.7 micro-USD each (700.7) hold 701 micro-USD."""
    assert estimate(PRICED, "fractional") == Estimate(701, 1001)


def test_max_cost_usd_of_a_token_priced_tool_derives_max_tokens() -> None:
    """With max_cost_usd the hold is that amount and max_tokens is floor((hold - cost) / dearest per-token price)."""
    assert estimate(PRICED, "budgeted") == Estimate(10_000, (10_000 - 1_000) // 1_000)
    assert estimate(PRICED, "budgeted_fractional") == Estimate(10_000, 14_285)  # 10000 / 0.7 = 14285.71…


def test_derived_max_tokens_is_capped_by_configured_max_tokens() -> None:
    """A configured max_tokens below what max_cost_usd affords caps the derived allowance."""
    assert estimate(PRICED, "budgeted_capped") == Estimate(10_000, 500)


def test_a_free_model_allows_the_configured_max_tokens() -> None:
    """When every token is free, max_cost_usd is held and the allowance is the configured max_tokens."""
    assert estimate(PRICED, "free_model") == Estimate(20_000, 40)


# --------------------------------------------------------------------------- actual_cost


def test_usage_is_priced_by_the_model_the_usage_names() -> None:
    """Tokens reported for a known model are charged at that model's prices, and the model is returned."""
    usage = TokenUsage(model="cheap-1", input_tokens=10, output_tokens=3)  # 1.5 + 2.1 = 3.6 → 4
    assert actual_cost(PRICED, "tokens", usage) == (1_000 + 4, "cheap-1")


def test_usage_naming_an_unknown_model_is_priced_by_the_tools_model() -> None:
    """Tokens of a model the table does not know (or of no model) fall back to the tool's configured model."""
    usage = TokenUsage(model="mystery-9", input_tokens=3, output_tokens=3)
    assert actual_cost(PRICED, "tokens", usage) == (1_000 + 300 + 3_000, "words-1")
    anonymous = TokenUsage(input_tokens=20, output_tokens=5)
    assert actual_cost(PRICED, "tokens", anonymous) == (1_000 + 2_000 + 5_000, "words-1")


def test_unpriced_usage_costs_only_the_per_call_price() -> None:
    """Tokens no model prices cost nothing: the cost is cost_usd and no model is named."""
    usage = TokenUsage(model="mystery-9", input_tokens=1_000, output_tokens=1_000)
    assert actual_cost(PRICED, "flat", usage) == (10_000, None)
    assert actual_cost(PRICED, "unknown__tool", usage) == (0, None)


def test_no_usage_costs_the_per_call_price() -> None:
    """A call that reported no usage costs its cost_usd, with no model."""
    assert actual_cost(PRICED, "tokens", None) == (1_000, None)
    assert actual_cost(PRICED, "flat", None) == (10_000, None)


def test_token_costs_round_up_to_whole_micro_dollars() -> None:
    """One input token at 0.15 micro-USD costs 1 micro-USD."""
    assert actual_cost(PRICED, "fractional", TokenUsage(input_tokens=1)) == (1, "cheap-1")


def test_usage_above_the_hold_is_charged_in_full() -> None:
    """The actual cost is what the tokens cost, even beyond the tool's max_tokens."""
    usage = TokenUsage(input_tokens=20, output_tokens=12)
    assert actual_cost(PRICED, "tokens", usage) == (1_000 + 2_000 + 12_000, "words-1")


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("window", "now", "key", "resets"),
    [
        ("day", ms(2026, 11, 21, 23, 59, 59, 999_000), "d20261121", ms(2026, 11, 22)),
        ("day", ms(2026, 11, 22), "d20261122", ms(2026, 11, 23)),
        ("day", ms(2026, 12, 31, 12), "d20261231", ms(2027, 1, 1)),
        ("day", ms(2028, 2, 28, 8), "d20280228", ms(2028, 2, 29)),
        ("month", ms(2026, 11, 30, 23, 59, 59, 999_000), "m202611", ms(2026, 12, 1)),
        ("month", ms(2026, 12, 1), "m202612", ms(2027, 1, 1)),
        ("month", ms(2026, 12, 31, 23, 59, 59, 999_000), "m202612", ms(2027, 1, 1)),
        ("month", ms(2027, 1, 1), "m202701", ms(2027, 2, 1)),
        ("month", ms(2028, 2, 10), "m202802", ms(2028, 3, 1)),
        ("total", ms(2026, 11, 21, 12), "total", None),
    ],
)
def test_window_key_and_reset_of_each_window(window: Window, now: int, key: str, resets: int | None) -> None:
    """Day and month windows are named by their UTC date and reset at the next midnight or 1st; total never resets."""
    assert window_key(window, now) == key
    assert resets_at_ms(window, now) == resets


def test_the_last_millisecond_of_a_window_and_the_first_of_the_next_differ() -> None:
    """23:59:59.999 and 00:00:00.000 UTC fall in different day windows, and the first's reset is the second."""
    last = ms(2026, 12, 31, 23, 59, 59, 999_000)
    first = last + 1
    assert (window_key("day", last), window_key("day", first)) == ("d20261231", "d20270101")
    assert (window_key("month", last), window_key("month", first)) == ("m202612", "m202701")
    assert resets_at_ms("day", last) == first
    assert resets_at_ms("month", last) == first

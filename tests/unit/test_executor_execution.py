"""Unit tests for services.executor.execution: backoff, success responses and time budgets."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp_types import CallToolResult

from services.executor import execution
from services.executor.backends import resolve_command
from services.executor.execution import backoff_delay, mcp_result, remaining_s, success_response, time_budget_s
from shared.config import BackoffConfig
from shared.contracts import CallStatus, ToolCallResponse, WorkItem

pytestmark = pytest.mark.unit

NOW_MS = 1_750_000_000_000
DEFAULT_BACKOFF = BackoffConfig(base_s=0.2, max_s=10)


class CeilingRandom(random.Random):
    """A Random whose uniform(a, b) always returns the upper bound b."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FloorRandom(random.Random):
    """A Random whose uniform(a, b) always returns the lower bound a."""

    def uniform(self, a: float, b: float) -> float:
        return a


def work_item(deadline_ms: int | None = None, request_id: str | int = "req-1") -> WorkItem:
    """A routed call of demo__echo."""
    return WorkItem(
        call_id="0190b8a4-3c1e-7d2a-9f00-1234567890ab", request_id=request_id, public_tool="demo__echo",
        server="demo", tool="echo", pool="default", arguments={"text": "x"}, principal="alice", priority=2,
        deadline_ms=deadline_ms, accepted_at_ms=NOW_MS - 10,
    )


def call_result(*, is_error: bool = False, **extra: Any) -> CallToolResult:
    """A backend CallToolResult built from its wire (camelCase) form."""
    return CallToolResult.model_validate({
        "content": [{"type": "text", "text": "x"}],
        "structuredContent": {"a": 1},
        "_meta": {"usage": {"input_tokens": 3, "cost_usd": "0.01"}},
        "isError": is_error,
        **extra,
    })


@pytest.fixture
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin the executor's clock at NOW_MS."""
    monkeypatch.setattr(execution, "now_ms", lambda: NOW_MS)
    return NOW_MS


# --------------------------------------------------------------------------- backoff_delay


BACKOFFS = st.builds(
    lambda base, factor: BackoffConfig(base_s=base, max_s=base * factor),
    st.floats(min_value=0.001, max_value=30, allow_nan=False, allow_infinity=False),
    st.floats(min_value=1, max_value=1000, allow_nan=False, allow_infinity=False),
)


@given(attempt=st.integers(min_value=1, max_value=30), seed=st.integers(), backoff=BACKOFFS)
def test_backoff_is_full_jitter_within_the_exponential_ceiling(attempt: int, seed: int, backoff: BackoffConfig) -> None:
    """The delay lies in [0, min(max_s, base_s * 2^(attempt-1))] for every attempt and seed."""
    delay = backoff_delay(attempt, backoff, random.Random(seed))
    assert 0 <= delay <= min(backoff.max_s, backoff.base_s * 2 ** (attempt - 1))
    assert delay <= backoff.max_s


@given(attempt=st.integers(min_value=1, max_value=30), seed=st.integers())
def test_backoff_is_reproducible_with_a_seeded_rng(attempt: int, seed: int) -> None:
    """The same seed gives the same delay, so retries can be replayed in tests."""
    assert backoff_delay(attempt, DEFAULT_BACKOFF, random.Random(seed)) == backoff_delay(
        attempt, DEFAULT_BACKOFF, random.Random(seed))


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (6, 6.4), (7, 10), (30, 10)])
def test_backoff_ceiling_doubles_up_to_max(attempt: int, ceiling: float) -> None:
    """The upper bound starts at base_s, doubles per attempt and is capped at max_s."""
    assert backoff_delay(attempt, DEFAULT_BACKOFF, CeilingRandom()) == pytest.approx(ceiling)
    assert backoff_delay(attempt, DEFAULT_BACKOFF, FloorRandom()) == 0


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_backoff_of_non_positive_attempts_uses_base(attempt: int) -> None:
    """Attempt numbers below 1 are treated as the first attempt, never a negative or fractional exponent."""
    assert backoff_delay(attempt, DEFAULT_BACKOFF, CeilingRandom()) == pytest.approx(0.2)


def test_backoff_without_rng_uses_module_random() -> None:
    """Without an rng the delay is still within bounds."""
    for attempt in range(1, 20):
        assert 0 <= backoff_delay(attempt, DEFAULT_BACKOFF) <= 10


@pytest.mark.parametrize("attempt", [1025, 2000, 100_000])
def test_backoff_of_huge_attempt_numbers_is_capped_not_overflowing(attempt: int) -> None:
    """However many deliveries a call has had, the delay is capped at max_s (no float overflow)."""
    assert backoff_delay(attempt, DEFAULT_BACKOFF, CeilingRandom()) == 10


# --------------------------------------------------------------------------- success_response


def test_success_response_of_a_good_result_is_ok() -> None:
    """A result without isError is answered with status ok and the producer's request id."""
    response, status = success_response(work_item(request_id=42), call_result())
    assert status is CallStatus.OK
    assert isinstance(response, ToolCallResponse)
    assert response.id == 42
    assert response.error is None
    assert response.result is not None
    assert response.result["isError"] is False


def test_success_response_of_a_tool_error_is_tool_error() -> None:
    """A result with isError true is answered with status tool_error, still as a result, not an error."""
    response, status = success_response(work_item(), call_result(is_error=True))
    assert status is CallStatus.TOOL_ERROR
    assert response.error is None
    assert response.result is not None
    assert response.result["isError"] is True


def test_success_response_without_is_error_is_ok() -> None:
    """A result that omits isError is ok."""
    result = CallToolResult.model_validate({"content": []})
    assert success_response(work_item(), result)[1] is CallStatus.OK


def test_result_keeps_mcp_wire_names() -> None:
    """The result keeps MCP's camelCase keys and `_meta`, with content and structuredContent intact."""
    response, _ = success_response(work_item(), call_result())
    result = response.result
    assert result is not None
    assert result["content"] == [{"type": "text", "text": "x"}]
    assert result["structuredContent"] == {"a": 1}
    assert result["_meta"] == {"usage": {"input_tokens": 3, "cost_usd": "0.01"}}
    assert "isError" in result
    assert not {"structured_content", "is_error", "meta"} & set(result)


def test_result_drops_nulls() -> None:
    """Absent optional members (no structuredContent, no _meta) are left out rather than sent as null."""
    result = mcp_result(CallToolResult.model_validate({"content": [{"type": "text", "text": "y"}]}))
    assert "structuredContent" not in result
    assert "_meta" not in result
    assert None not in result.values()
    assert result["content"] == [{"type": "text", "text": "y"}]


def test_result_round_trips_through_the_mcp_model() -> None:
    """The dumped result validates back into an equal CallToolResult."""
    original = call_result()
    assert CallToolResult.model_validate(mcp_result(original)) == original


def test_response_serialises_as_json_rpc() -> None:
    """The whole response dumps to a JSON-RPC 2.0 result object carrying the MCP result unchanged."""
    response, _ = success_response(work_item(request_id="r"), call_result())
    wire = response.model_dump(mode="json", exclude_none=True)
    assert wire["jsonrpc"] == "2.0"
    assert wire["id"] == "r"
    assert wire["result"]["structuredContent"] == {"a": 1}
    assert "error" not in wire


# --------------------------------------------------------------------------- time budget


def test_no_deadline_uses_the_pool_timeout(frozen_now: int) -> None:
    """Without a deadline an attempt may run for the pool timeout, which is not the call's own limit."""
    assert remaining_s(work_item()) is None
    assert time_budget_s(work_item(), 20.0) == (20.0, False)


def test_sooner_deadline_limits_the_attempt(frozen_now: int) -> None:
    """A deadline sooner than the pool timeout limits the attempt to the time remaining."""
    work = work_item(deadline_ms=frozen_now + 5_000)
    assert remaining_s(work) == 5.0
    assert time_budget_s(work, 20.0) == (5.0, True)


def test_later_deadline_leaves_the_pool_timeout(frozen_now: int) -> None:
    """A deadline later than the pool timeout leaves the pool timeout in charge."""
    work = work_item(deadline_ms=frozen_now + 60_000)
    assert time_budget_s(work, 20.0) == (20.0, False)


def test_deadline_equal_to_pool_timeout_is_the_pool_timeout(frozen_now: int) -> None:
    """When deadline and pool timeout coincide, the pool timeout is reported as the limit."""
    assert time_budget_s(work_item(deadline_ms=frozen_now + 20_000), 20.0) == (20.0, False)


@pytest.mark.parametrize("offset_ms", [0, -1, -60_000])
def test_passed_deadline_leaves_no_time(frozen_now: int, offset_ms: int) -> None:
    """A deadline at or before now leaves 0 seconds (never negative), limited by the deadline."""
    work = work_item(deadline_ms=frozen_now + offset_ms)
    remaining = remaining_s(work)
    assert remaining is not None
    assert remaining <= 0
    assert time_budget_s(work, 20.0) == (0.0, True)


@given(
    offset_ms=st.integers(min_value=-(10**9), max_value=10**9),
    pool_timeout_s=st.floats(min_value=0.001, max_value=1e6),
)
def test_budget_never_exceeds_either_limit(offset_ms: int, pool_timeout_s: float) -> None:
    """The budget is never negative and never longer than the pool timeout or the time left."""
    work = work_item(deadline_ms=NOW_MS + offset_ms)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(execution, "now_ms", lambda: NOW_MS)
        budget, by_deadline = time_budget_s(work, pool_timeout_s)
    assert 0 <= budget <= pool_timeout_s
    assert budget <= max(offset_ms / 1000, 0) or not by_deadline
    assert by_deadline == (offset_ms / 1000 < pool_timeout_s)


def test_server_commands_resolve_to_the_environment_toolbus_runs_in() -> None:
    """`python` is this interpreter, a program installed beside it wins over PATH, paths and unknowns stay."""
    here = Path(sys.executable).parent
    assert resolve_command("python") == sys.executable
    assert resolve_command("mcp-server-git") == str(here / "mcp-server-git")
    assert resolve_command("/usr/bin/env") == "/usr/bin/env"
    assert resolve_command("no-such-program-xyz") == "no-such-program-xyz"

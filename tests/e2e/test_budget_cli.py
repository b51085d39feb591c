"""`toolbus budget show|set|rebuild` against a live `toolbus up`: runtime limits refuse and free calls,
spend is shown in micro-USD (JSON) and USD (table), and a rebuild restores counters Redis lost.

Principal `x` spends its user budget once for the module (`spent_on_x`); principal `y` is only
used by the `--remove` test, so the tests never share a scope they change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.config import hash_api_key
from tests.helpers import toolbus, toolbus_up

pytestmark = [pytest.mark.e2e]

PREFIX = f"budcli{uuid.uuid4().hex[:8]}"
KEYS = {"x": f"key-x-{PREFIX}", "y": f"key-y-{PREFIX}"}
WIDE = {"COLUMNS": "200"}  # rich wraps tables and typer error panels at 80 columns when output is no terminal
SCOPE_FORMAT = "<org|team|project|user|key>:<name>"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object]]]:
    """`toolbus up` with the demo server, a $0.01 `demo__echo`, and principals `x` and `y` of scopes user:x, user:y."""
    config = {
        "prefix": PREFIX,
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]}},
        "principals": [{"name": name, "key_sha256": hash_api_key(key), "roles": ["user"], "scope": {"user": name}}
                       for name, key in KEYS.items()],
        "roles": {"user": {"allow": ["*"]}},
        "tools": {"demo__echo": {"cost_usd": "0.01"}},
    }
    with toolbus_up(tmp_path_factory.mktemp("budget"), config) as running:
        yield running


def budget(mesh: tuple[Path, dict[str, object]], *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return toolbus("budget", *args, "--data-dir", str(mesh[0]), env=env)


def call_echo(mesh: tuple[Path, dict[str, object]], principal: str) -> subprocess.CompletedProcess[str]:
    return toolbus("call", "demo__echo", "text=hi", "--json", "--data-dir", str(mesh[0]),
                   env={"TOOLBUS_API_KEY": KEYS[principal]})


def error_code(called: subprocess.CompletedProcess[str]) -> int | None:
    response: dict[str, Any] = json.loads(called.stdout)
    return response["error"]["code"] if "error" in response else None


def shown(mesh: tuple[Path, dict[str, object]], scope: str) -> dict[str, Any]:
    """The one budget `budget show SCOPE --json` reports (which must exit 0)."""
    done = budget(mesh, "show", scope, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    budgets: list[dict[str, Any]] = json.loads(done.stdout)["budgets"]
    assert len(budgets) == 1, budgets
    return budgets[0]


@pytest.fixture(scope="module")
def spent_on_x(mesh: tuple[Path, dict[str, object]]) -> list[subprocess.CompletedProcess[str]]:
    """`budget set user:x --limit-usd 0.02 --window total`, then three $0.01 calls by `x`."""
    limited = budget(mesh, "set", "user:x", "--limit-usd", "0.02", "--window", "total")
    assert limited.returncode == 0, limited.stdout + limited.stderr
    return [limited, *(call_echo(mesh, "x") for _ in range(3))]


def test_a_runtime_limit_lets_two_calls_run_and_refuses_the_third(
        spent_on_x: list[subprocess.CompletedProcess[str]]) -> None:
    """A $0.02 limit set by `budget set` runs two $0.01 calls and refuses the third with -32010."""
    limited, first, second, third = spent_on_x
    assert "total limit of user:x set to 20000 micro-USD ($0.02)" in limited.stdout
    assert [error_code(c) for c in (first, second)] == [None, None], first.stdout + second.stdout
    assert third.returncode == 1 and error_code(third) == -32010, third.stdout


def test_show_json_reports_spend_in_micro_usd(mesh: tuple[Path, dict[str, object]],
                                              spent_on_x: list[subprocess.CompletedProcess[str]]) -> None:
    """`budget show SCOPE --json` gives limit, spend and remaining as integer micro-USD, with spend per tool."""
    shown_x = shown(mesh, "user:x")
    assert (shown_x["limit_micros"], shown_x["spent_micros"], shown_x["held_micros"]) == (20000, 20000, 0)
    assert shown_x["remaining_micros"] == 0 and shown_x["by_tool"] == {"demo__echo": 20000}
    assert (shown_x["window"], shown_x["resets_at_ms"], shown_x["source"]) == ("total", None, "runtime")


def test_show_table_prints_usd_amounts(mesh: tuple[Path, dict[str, object]],
                                       spent_on_x: list[subprocess.CompletedProcess[str]]) -> None:
    """`budget show` prints a row per budget with USD amounts, a window that never resets, and spend per tool."""
    done = budget(mesh, "show", env=WIDE)
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if "user:x" in line and "total" in line)
    assert row.count("$0.02") == 2 and "$0.00" in row and "never" in row and "runtime" in row, row
    assert "user:x:total spent by tool: demo__echo $0.02" in done.stdout


def test_show_of_a_scope_without_budget_exits_1(mesh: tuple[Path, dict[str, object]]) -> None:
    """`budget show` of a scope nobody limited says so and exits 1."""
    done = budget(mesh, "show", "user:nobody")
    assert done.returncode == 1 and "no budget for user:nobody" in done.stderr, done.stdout + done.stderr


def test_set_refuses_a_malformed_scope_and_inexact_amounts(mesh: tuple[Path, dict[str, object]]) -> None:
    """`budget set` refuses a scope without a kind, or an amount finer than a micro-USD, as a usage error (exit 2)."""
    bad_scope = budget(mesh, "set", "alice", "--limit-usd", "1", env=WIDE)
    assert bad_scope.returncode == 2 and SCOPE_FORMAT in bad_scope.stderr, bad_scope.stderr
    too_fine = budget(mesh, "set", "user:x", "--limit-usd", "0.0000001", env=WIDE)
    assert too_fine.returncode == 2 and "not a whole number of micro-USD" in too_fine.stderr, too_fine.stderr
    bad_alert = budget(mesh, "set", "user:x", "--limit-usd", "1", "--alert-at", "0.8,1.5", env=WIDE)
    assert bad_alert.returncode == 2 and "fractions in (0, 1]" in bad_alert.stderr, bad_alert.stderr


def test_remove_lifts_a_runtime_limit(mesh: tuple[Path, dict[str, object]]) -> None:
    """After `budget set SCOPE --remove`, a call the limit refused runs again."""
    assert budget(mesh, "set", "user:y", "--limit-usd", "0.01", "--window", "total").returncode == 0
    assert [error_code(call_echo(mesh, "y")) for _ in range(2)] == [None, -32010]
    removed = budget(mesh, "set", "user:y", "--remove", "--window", "total")
    assert removed.returncode == 0 and "total limit of user:y removed" in removed.stdout, removed.stdout
    assert error_code(call_echo(mesh, "y")) is None


def test_no_budget_service_exits_1(mesh: tuple[Path, dict[str, object]]) -> None:
    """Against a prefix no accountant serves, `budget show` says no budget service answered and exits 1."""
    done = budget(mesh, "show", env={"TOOLBUS_PREFIX": f"{PREFIX}-none"})
    assert done.returncode == 1 and "no budget service answered" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_rebuild_restores_counters_redis_lost(mesh: tuple[Path, dict[str, object]],
                                              spent_on_x: list[subprocess.CompletedProcess[str]]) -> None:
    """When Redis loses the counters, `budget show` warns and exits 3; `budget rebuild` restores the same spend."""
    before = shown(mesh, "user:x")
    _forget_budget_keys(str(mesh[1]["redis_url"]))
    assert call_echo(mesh, "x").returncode == 1  # the accountant finds its epoch gone and fails closed
    lost = budget(mesh, "show", "user:x")
    assert lost.returncode == 3 and "toolbus budget rebuild" in lost.stderr, lost.stdout + lost.stderr
    rebuilt = budget(mesh, "rebuild")
    assert rebuilt.returncode == 0 and "rebuilt the budget counters" in rebuilt.stdout, rebuilt.stdout
    assert "spent $" in rebuilt.stdout and "held $0.00" in rebuilt.stdout, rebuilt.stdout
    assert shown(mesh, "user:x") == before


def _forget_budget_keys(redis_url: str) -> None:
    """What a Redis restarted without its data looks like to this mesh: none of its budget keys."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{PREFIX}:budget}}:*"))
        assert keys, "the mesh keeps its budget counters under its prefix"
        client.delete(*keys)
    finally:
        client.close()

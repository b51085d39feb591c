"""Operating a pool from the CLI: dead letters replayed, workers scaled up and drained, status read."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import ToolbusClient
from shared.config import hash_api_key
from tests.conftest import ADMIN_KEY
from tests.helpers import eventually, executions, toolbus, toolbus_up

pytestmark = [pytest.mark.e2e]

Running = tuple[Path, dict[str, object], Path]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`toolbus up` with one demo worker that records executions and crashes on `fragile` while told to."""
    root = tmp_path_factory.mktemp("ops")
    env = {"TOOLBUS_DEMO_RECORD": str(root / "record.jsonl"), "TOOLBUS_DEMO_BROKEN_FILE": str(root / "broken")}
    config = {
        "servers": {"demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"], "env": env}},
        "pools": {"default": {"workers": 1, "concurrency": 8, "max_deliveries": 2, "ack_wait_s": 2,
                              "backoff": {"base_s": 0.05, "max_s": 0.1}, "breaker": {"fail_max": 100}}},
        "principals": [{"name": "admin", "key_sha256": hash_api_key(ADMIN_KEY), "roles": ["admin"]}],
        "roles": {"admin": {"allow": ["*"]}},
    }
    with toolbus_up(root, config) as (data_dir, runtime):
        yield data_dir, runtime, root


def cli(running: Running, *args: str) -> dict[str, object] | list[object]:
    data_dir = running[0]
    done = toolbus(*args, "--data-dir", str(data_dir), env={"TOOLBUS_API_KEY": ADMIN_KEY})
    assert done.returncode == 0, done.stdout + done.stderr
    parsed: dict[str, object] | list[object] = json.loads(done.stdout)
    return parsed


def test_dead_letter_is_listed_shown_and_replayed(mesh: Running) -> None:
    """A call that keeps crashing its backend is dead-lettered; after the fix, `dlq replay` completes it."""
    data_dir, runtime, root = mesh
    (root / "broken").touch()
    called = toolbus("call", "demo__fragile", "--json", "--data-dir", str(data_dir), env={"TOOLBUS_API_KEY": ADMIN_KEY})
    assert called.returncode == 1
    response = json.loads(called.stdout)
    assert response["error"]["code"] == -32060
    call_id = response["error"]["data"]["call_id"]
    listed = cli(mesh, "dlq", "list", "--json")
    assert isinstance(listed, list) and [e["work"]["call_id"] for e in listed] == [call_id]  # type: ignore[index]
    shown = cli(mesh, "dlq", "show", call_id)
    assert isinstance(shown, dict) and len(shown["attempts"]) == 2  # type: ignore[arg-type]
    (root / "broken").unlink()
    replayed = toolbus("dlq", "replay", call_id, "--data-dir", str(data_dir))
    assert replayed.returncode == 0, replayed.stderr
    result = asyncio.run(_wait_ok(str(runtime["nats_url"]), call_id))
    assert result == "ok"
    assert cli(mesh, "dlq", "list", "--json") == []
    runs = [e for e in executions(root / "record.jsonl") if e["call_id"] == call_id]
    assert len(runs) == 3, "two failed attempts, then the replay"


async def _wait_ok(nats_url: str, call_id: str) -> str:
    async with ToolbusClient(nats_url, ADMIN_KEY) as client:

        async def replaced() -> str | None:
            stored = await client.fetch_result(call_id)
            return stored.text if stored is not None and stored.response.error is None else None

        return await eventually(replaced, timeout=30)


def test_scale_up_adds_workers_and_scale_down_drains_in_flight_calls(mesh: Running) -> None:
    """`toolbus scale` starts a second worker (status sees it), and scaling to 0 lets running calls finish first."""
    data_dir, runtime, _root = mesh
    scaled = toolbus("scale", "default", "2", "--data-dir", str(data_dir))
    assert scaled.returncode == 0 and "1 → 2" in scaled.stdout, scaled.stdout + scaled.stderr
    status = cli(mesh, "status", "--json")
    assert isinstance(status, dict)
    pool = next(p for p in status["pools"] if p["pool"] == "default")  # type: ignore[attr-defined]
    assert pool["workers_alive"] == 2
    results = asyncio.run(_scale_to_zero_while_busy(str(runtime["nats_url"]), data_dir))
    assert results == ["slept 1500 ms"] * 4
    assert toolbus("scale", "default", "1", "--data-dir", str(data_dir)).returncode == 0


async def _scale_to_zero_while_busy(nats_url: str, data_dir: Path) -> list[str]:
    async with ToolbusClient(nats_url, ADMIN_KEY) as client:
        calls = [await client.submit("demo__sleep_ms", {"ms": 1500}) for _ in range(4)]
        root = data_dir.parent
        await eventually(lambda: _all_started(root, calls), timeout=30)
        drained = await asyncio.to_thread(toolbus, "scale", "default", "0", "--data-dir", str(data_dir))
        assert drained.returncode == 0, drained.stderr
        return [(await client.wait_result(c, timeout_s=5)).text for c in calls]


async def _all_started(root: Path, calls: list[str]) -> bool:
    await asyncio.sleep(0)
    started = {e["call_id"] for e in executions(root / "record.jsonl")}
    return all(c in started for c in calls)

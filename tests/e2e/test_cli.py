"""The `toolbus` command: config check, up (runtime.json, SIGTERM), call and tools against a live mesh."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from shared.config import hash_api_key
from shared.mesh import free_port
from tests.conftest import ADMIN_KEY
from tests.helpers import toolbus, toolbus_up

pytestmark = [pytest.mark.e2e]

@pytest.fixture(scope="module")
def running_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object]]]:
    """`toolbus up` in a subprocess, servers named by bare commands as in toolbus.yaml; yields (data dir, runtime.json).

    PATH leaves out this venv, as when `make up` runs `.venv/bin/toolbus` in a plain shell.
    """
    config = {
        "servers": {"demo": {"command": "python", "args": ["-m", "services.demo_tools"]},
                    "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"]}},
        "principals": [{"name": "admin", "key_sha256": hash_api_key(ADMIN_KEY), "roles": ["admin"]}],
        "roles": {"admin": {"allow": ["*"]}},
    }
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    with toolbus_up(tmp_path_factory.mktemp("up"), config, env={"PATH": path}) as running:
        yield running


def test_config_check_names_the_bad_field(tmp_path: Path) -> None:
    """`toolbus config check` exits 1 and prints the path and reason of a bad field."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  git: {command: mcp-server-git, pool: nowhere}\n")
    checked = toolbus("config", "check", str(bad))
    assert checked.returncode == 1
    assert "servers.git.pool" in checked.stderr and "nowhere" in checked.stderr


def test_config_check_accepts_the_shipped_configs() -> None:
    """The repository's toolbus.yaml and toolbus.example.yaml are valid."""
    root = Path(__file__).resolve().parents[2]
    for name in ("toolbus.yaml", "toolbus.example.yaml"):
        checked = toolbus("config", "check", str(root / name), env={"REMOTE_TOKEN": "x"})
        assert checked.returncode == 0, checked.stderr


def test_up_writes_runtime_json(running_mesh: tuple[Path, dict[str, object]]) -> None:
    """runtime.json names the NATS and Redis URLs, the MCP gateway and the live pid."""
    _data_dir, runtime = running_mesh
    assert str(runtime["nats_url"]).startswith("nats://127.0.0.1:")
    assert str(runtime["redis_url"]).startswith("redis://127.0.0.1:")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/mcp", str(runtime["gateway_url"]))
    os.kill(int(str(runtime["pid"])), 0)  # raises if the process is gone


async def test_the_gateway_toolbus_up_starts_serves_mcp_clients(running_mesh: tuple[Path, dict[str, object]]) -> None:
    """The `gateway_url` of runtime.json is a working MCP endpoint: the admin's key lists and calls tools."""
    _data_dir, runtime = running_mesh
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http,
        Client(streamable_http_client(str(runtime["gateway_url"]), http_client=http)) as client,
    ):
        listed = {tool.name for tool in (await client.list_tools()).tools}
        echoed = await client.call_tool("demo__echo", {"text": "via toolbus up"})
    assert {"demo__echo", "time__get_current_time"} <= listed
    assert echoed.structured_content == {"result": "via toolbus up"}


def test_call_prints_the_result(running_mesh: tuple[Path, dict[str, object]]) -> None:
    """`toolbus call` finds the mesh through runtime.json, parses key=value, prints the result."""
    data_dir, _ = running_mesh
    env = {"TOOLBUS_API_KEY": ADMIN_KEY}
    called = toolbus("call", "demo__echo", "text=hello cli", "--data-dir", str(data_dir), env=env)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"result": "hello cli"}


def test_servers_named_by_bare_commands_run_in_toolbus_own_environment(
        running_mesh: tuple[Path, dict[str, object]]) -> None:
    """`python` and `mcp-server-time` resolve to this venv's interpreter and script even off PATH."""
    data_dir, _ = running_mesh
    called = toolbus("call", "time__get_current_time", "timezone=UTC", "--data-dir", str(data_dir),
                     env={"TOOLBUS_API_KEY": ADMIN_KEY})
    assert called.returncode == 0, called.stdout + called.stderr
    assert json.loads(called.stdout)["timezone"] == "UTC"


def test_call_exit_codes_tell_errors_apart(running_mesh: tuple[Path, dict[str, object]]) -> None:
    """A tool error exits 4; a refusal exits 1 and says why."""
    data_dir, _ = running_mesh
    env = {"TOOLBUS_API_KEY": ADMIN_KEY}
    tool_error = toolbus("call", "demo__fail", "message=boom", "--data-dir", str(data_dir), env=env)
    refused = toolbus("call", "demo__echo", "--data-dir", str(data_dir), env={"TOOLBUS_API_KEY": "wrong"})
    assert tool_error.returncode == 4 and "boom" in tool_error.stdout
    assert refused.returncode == 1 and "unauthenticated" in refused.stdout


def test_tools_lists_the_registry(running_mesh: tuple[Path, dict[str, object]]) -> None:
    """`toolbus tools --json` lists every demo tool with its pool and input schema."""
    data_dir, _ = running_mesh
    listed = toolbus("tools", "--json", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    specs = {spec["public_name"]: spec for spec in json.loads(listed.stdout)}
    assert {"demo__echo", "demo__sleep_ms", "demo__summarize"} <= set(specs)
    assert specs["demo__echo"]["pool"] == "default"
    assert specs["demo__echo"]["input_schema"]["required"] == ["text"]


@pytest.mark.parametrize("command", [["status"], ["tools"], ["dlq", "list"], ["budget", "show"],
                                     ["scale", "default", "2"]])
def test_commands_fail_fast_on_a_dead_nats(command: list[str], tmp_path: Path) -> None:
    """Against a NATS that is not there, a command exits 1 within seconds and names the URL (no retry loop)."""
    dead = f"nats://127.0.0.1:{free_port()}"
    done = toolbus(*command, "--nats-url", dead, "--data-dir", str(tmp_path), timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert dead in " ".join((done.stdout + done.stderr).split())

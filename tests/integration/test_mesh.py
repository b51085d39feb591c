"""`toolbus up`'s Mesh uses external NATS and Redis when the config names them, and restarts dead services."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from shared.client import ToolbusClient
from shared.config import Config
from shared.embedded import NatsServer, RedisServer
from shared.mesh import Mesh
from tests.conftest import ADMIN_KEY, make_config
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def external_config(git_repo: Path, nats: NatsServer, redis: RedisServer) -> Config:
    demo_only = make_config(git_repo).model_dump(mode="json")
    demo_only["servers"] = {"demo": demo_only["servers"]["demo"]}
    demo_only.update(nats={"url": nats.url}, redis={"url": redis.url}, gateway={"port": 0})
    return Config.model_validate(demo_only)


async def test_mesh_uses_configured_servers_and_restarts_dead_services(
    git_repo: Path, nats_server: NatsServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With nats.url/redis.url set no embedded server starts, and a killed router process is replaced."""
    mesh = Mesh(external_config(git_repo, nats_server, redis_server), tmp_path)
    info = await mesh.start()
    try:
        assert (info.nats_url, info.redis_url) == (nats_server.url, redis_server.url)
        assert mesh.nats is None and mesh.redis is None
        assert (tmp_path / "runtime.json").exists()
        router = next(s for s in mesh.services if s.name == "router")
        assert router.process is not None
        os.kill(router.process.pid, signal.SIGKILL)
        await eventually(lambda: _restarted(mesh), timeout=30)
        async with ToolbusClient(nats_server.url, ADMIN_KEY) as client:
            assert (await client.call("demo__echo", {"text": "via the new router"})).text == "via the new router"
    finally:
        await mesh.stop()
    assert not (tmp_path / "runtime.json").exists()


async def _restarted(mesh: Mesh) -> bool:
    router = next(s for s in mesh.services if s.name == "router")
    return router.restarts >= 1 and router.process is not None and router.process.returncode is None

"""A 3-node NATS cluster (R3 streams) loses the WORK stream leader to kill -9 under load; no call is lost.

DESIGN.md §8: "No accepted call is lost: … one node of a 3-node NATS cluster under load; every
accepted call gets exactly one final result." Router and workers are separate processes that
know all three nodes; 600 calls are accepted, then the node leading WORK is SIGKILLed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from shared.config import Config
from shared.embedded import ClusterSettings, NatsServer, NatsServerSettings, RedisServer
from shared.mesh import bootstrap, free_port
from tests.chaos.test_pool_under_load import load_config, load_with_fault
from tests.helpers import ServiceProcessHandle, eventually

pytestmark = [pytest.mark.chaos]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three JetStream nodes routed to each other on loopback."""
    client_ports, route_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    nodes = [
        NatsServer(NatsServerSettings(
            data_dir=tmp_path / f"n{i}", port=client_ports[i], name=f"n{i}",
            cluster=ClusterSettings(name="toolbus-test", port=route_ports[i], routes=tuple(route_ports)),
        ))
        for i in range(3)
    ]
    for node in nodes:
        node.start()
    yield nodes
    for node in nodes:
        if node.pid is not None:
            node.stop()


async def bootstrap_when_formed(url: str, config: Config) -> None:
    """JetStream needs a meta leader before streams can be created: retry until the cluster formed."""

    async def formed() -> bool:
        try:
            await bootstrap(url, config)
        except Exception:  # noqa: BLE001  # "JetStream system temporarily unavailable" until formed
            return False
        return True

    await eventually(formed, timeout=60, interval=0.5)


async def work_leader(url: str) -> str:
    nc = await nats.connect(url.split(","))
    try:
        info = await nc.jetstream().stream_info("WORK")
    finally:
        await nc.close()
    assert info.cluster is not None and info.cluster.leader is not None
    assert len(info.cluster.replicas or []) == 2, "WORK must be replicated on all three nodes"
    return str(info.cluster.leader)


async def test_losing_the_work_leader_node_under_load_loses_nothing(
    cluster: list[NatsServer], redis_server: RedisServer, git_repo: Path, tmp_path: Path
) -> None:
    """600 calls, the node leading WORK killed with SIGKILL: every call gets exactly one ok result."""
    url = ",".join(node.url for node in cluster)
    record = tmp_path / "record.jsonl"
    config = Config.model_validate(load_config(git_repo, record).model_dump(mode="json") | {"nats": {"replicas": 3}})
    await bootstrap_when_formed(url, config)
    services = [ServiceProcessHandle("services.executor", url, tmp_path / f"worker-{n}.log",
                                     "--redis-url", redis_server.url, "--instance", f"worker-{n}") for n in (1, 2)]
    services.append(ServiceProcessHandle("services.router", url, tmp_path / "router.log"))
    try:
        await asyncio.gather(*(s.wait_ready() for s in services))
        leader = await work_leader(url)
        doomed = next(node for node in cluster if node.settings.name == leader)
        survivors = ",".join(node.url for node in cluster if node is not doomed)
        await load_with_fault(url, record, lambda: asyncio.to_thread(doomed.kill), check_url=survivors)
    finally:
        assert all(s.stop() == 0 for s in services)


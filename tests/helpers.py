"""Test helpers that need no fixtures: an in-process mesh and bounded waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from shared.config import Config
from shared.mesh import bootstrap
from services.executor.app import ExecutorService, ExecutorSettings
from services.router.app import RouterService, RouterSettings

T = TypeVar("T")


class InProcessMesh:
    """Router + one executor per served pool, as asyncio tasks of the test's event loop."""

    def __init__(self, nats_url: str, config: Config) -> None:
        self.nats_url = nats_url
        self.config = config
        self.router = RouterService(RouterSettings(nats_url, config.prefix, instance="router-test"))
        pools = sorted({server.pool for server in config.servers.values()})
        self.executors = [ExecutorService(ExecutorSettings(nats_url, pool, config.prefix, f"executor-{pool}-test"))
                          for pool in pools]

    async def __aenter__(self) -> InProcessMesh:
        await bootstrap(self.nats_url, self.config)
        await asyncio.gather(*(executor.start() for executor in self.executors))
        await self.router.start()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.router.stop()
        await asyncio.gather(*(executor.stop() for executor in self.executors))


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy (bounded by `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(interval)

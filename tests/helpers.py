"""Test helpers that need no fixtures: an in-process mesh and bounded waiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import nats
import yaml

from services.audit.app import AuditService, AuditSettings
from services.budget.app import BudgetService, BudgetSettings
from services.context.app import ContextService, ContextSettings
from services.executor.app import ExecutorService, ExecutorSettings
from services.gateway.app import GatewayService, GatewaySettings
from services.router.app import RouterService, RouterSettings
from shared.audit.notes import VerifierKey
from shared.audit.reader import read_log
from shared.audit.verifier import Report, StoredMessage, VerifyOptions, verify_log
from shared.config import Config
from shared.mesh import bootstrap, free_port, http_ok
from shared.outcomes import now_ms
from shared.subjects import Subjects, work_durable

T = TypeVar("T")


class InProcessMesh:
    """Budget accountant + router + one executor per served pool (+ the audit writer when given a
    log key, + the context store and the MCP gateway when asked), as asyncio tasks of the test's
    event loop (the accountant only when the config has accounting on). The gateway listens on a
    free port: `mesh.gateway.url`."""

    def __init__(self, nats_url: str, config: Config, redis_url: str, workers: int = 1,
                 audit_key: Path | None = None, context: bool = False, gateway: bool = False) -> None:
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.config = config
        self.budget = BudgetService(BudgetSettings(nats_url, config.prefix, "budget-test", redis_url)) \
            if config.accounting.enabled else None
        self.router = RouterService(RouterSettings(nats_url, config.prefix, instance="router-test"))
        # The audit writer only when a test hands it a log key: most tests have no use for it.
        self.audit = AuditService(AuditSettings(nats_url, audit_key, config.prefix, "audit-test")) \
            if audit_key is not None else None
        self.context = ContextService(ContextSettings(nats_url, config.prefix, "context-test", redis_url)) \
            if context else None
        self._gateway = GatewayService(GatewaySettings(nats_url, config.prefix, "gateway-test", port=0)) \
            if gateway else None
        pools = sorted({server.pool for server in config.servers.values()})
        self.executors = [
            ExecutorService(ExecutorSettings(nats_url, pool, config.prefix, f"executor-{pool}-{n}", redis_url))
            for pool in pools for n in range(1, workers + 1)
        ]

    async def __aenter__(self) -> InProcessMesh:
        await bootstrap(self.nats_url, self.config)
        if self.audit is not None:
            await self.audit.start()
        if self.budget is not None:
            await self.budget.start()
        if self.context is not None:
            await self.context.start()
        await asyncio.gather(*(executor.start() for executor in self.executors))
        await self.router.start()
        if self._gateway is not None:
            await self._gateway.start()
        return self

    @property
    def gateway(self) -> GatewayService:
        assert self._gateway is not None, "InProcessMesh(..., gateway=True) runs one"
        return self._gateway

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
        await self.router.stop()
        await asyncio.gather(*(executor.stop() for executor in self.executors))
        if self.budget is not None:
            await self.budget.stop()
        if self.context is not None:
            await self.context.stop()
        if self.audit is not None:
            await self.audit.stop()


async def work_settled(nats_url: str, pool: str = "default") -> bool:
    """True when no call of the pool waits or runs (every priority's consumer is drained and acked)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        infos = [await js.consumer_info("WORK", work_durable(pool, p)) for p in range(4)]
    finally:
        await nc.close()
    return all(info.num_pending == 0 and info.num_ack_pending == 0 for info in infos)


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy (bounded by `timeout`)."""
    async with asyncio.timeout(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(interval)


class ServiceProcessHandle:
    """A service started as its own process (`python -m services.<name>`), logging JSON to a file."""

    def __init__(self, module: str, nats_url: str, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        argv = [sys.executable, "-m", module, "--nats-url", nats_url, "--http-port", str(self.port), *extra]
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(argv, stdout=log_file, stderr=log_file)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until `/readyz` answers 200, failing early if the process died."""

        async def ready() -> bool:
            assert self.process.poll() is None, f"{self.log_path.name} died:\n{self.log_path.read_text()[-3000:]}"
            return await http_ok(f"http://127.0.0.1:{self.port}/readyz")

        await eventually(ready, timeout=timeout, interval=0.1)

    def log_lines(self) -> list[dict[str, object]]:
        """The JSON log lines written so far (non-JSON lines, e.g. a backend's stderr, skipped)."""
        lines = []
        for raw in self.log_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(raw)
                if isinstance(value, dict):
                    lines.append(value)
        return lines

    def stop(self) -> int:
        """SIGTERM and wait (the graceful path); returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash would."""
        self.process.kill()
        self.process.wait(timeout=10)


def executions(record: Path) -> list[dict[str, object]]:
    """The demo server's execution record: one entry per time a tool really ran (started; the
    `sleep_ms.finished` lines that say a sleep ran to its end are left out)."""
    if not record.exists():
        return []
    entries = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return [entry for entry in entries if not str(entry["tool"]).endswith(".finished")]


TOOLBUS = [sys.executable, "-c", "from shared.cli import main; main()"]


def toolbus(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the `toolbus` command in a subprocess, capturing its output."""
    return subprocess.run([*TOOLBUS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@contextlib.contextmanager
def toolbus_up(root: Path, config: Mapping[str, object], env: Mapping[str, str] | None = None
               ) -> Iterator[tuple[Path, dict[str, object]]]:
    """`toolbus up` in a subprocess on `config`; yields (data dir, runtime.json); SIGTERM must stop it cleanly.

    The gateway listens on a free port unless `config` says otherwise (8765 may be taken by a `make up`)."""
    (root / "toolbus.yaml").write_text(yaml.safe_dump({"gateway": {"port": 0}, **config}))
    data_dir, output = root / "data", root / "up.log"
    with output.open("w") as log_file:
        up = subprocess.Popen([*TOOLBUS, "up", "--config", str(root / "toolbus.yaml"), "--data-dir", str(data_dir)],
                              stdout=log_file, stderr=log_file, env={**os.environ, **(env or {})})
    runtime = data_dir / "runtime.json"
    deadline = time.monotonic() + 90
    while not runtime.exists():
        assert up.poll() is None, output.read_text()
        assert time.monotonic() < deadline, "toolbus up was not ready in 90 s"
        time.sleep(0.1)  # polling a file another process writes; bounded by the deadline above
    try:
        yield data_dir, json.loads(runtime.read_text())
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, output.read_text()[-3000:]
    assert not runtime.exists(), "runtime.json must be removed on exit"


async def verify_audit_log(url: str, prefix: str, log_key: VerifierKey) -> tuple[list[StoredMessage], Report]:
    """Read log `main` of a mesh back from NATS and verify it as `toolbus audit verify` would."""
    nc = await nats.connect(url)
    try:
        snapshot = await read_log(nc.jetstream(), Subjects(prefix), "main")
    finally:
        await nc.close()
    options = VerifyOptions(log_key, "main", Subjects(prefix), now_ms=now_ms())
    return snapshot.records, verify_log(snapshot.records, snapshot.checkpoints, snapshot.policies, options)

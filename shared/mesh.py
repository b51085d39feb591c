"""`toolbus up`: embedded NATS and Redis, the config in the registry, every service as a process.

The mesh writes `<data-dir>/runtime.json` once every service answers `/readyz`, restarts a
service process that dies, and on SIGTERM/Ctrl-C drains services first, then the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from shared.audit.notes import SigningKey
from shared.bus import connect, provision_streams
from shared.config import Config, config_to_json
from shared.contracts import EventKind, RuntimeInfo, ScaleReply, ScaleRequest, ServiceEndpoint
from shared.embedded import NatsServer, NatsServerSettings, RedisServer, RedisServerSettings
from shared.outcomes import Outcomes
from shared.registry import Registry
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 35.0
RUNTIME_FILE = "runtime.json"


async def bootstrap(nats_url: str, config: Config) -> None:
    """Provision every stream and publish the config to the registry (safe to repeat)."""
    nc = await connect(nats_url, name="toolbus-bootstrap")
    try:
        js = nc.jetstream()
        await provision_streams(js, Subjects(config.prefix), replicas=config.nats.replicas)
        registry = await Registry.open(js, create=True, replicas=config.nats.replicas)
        revision = await registry.put_config(config)
        digest = hashlib.sha256(config_to_json(config)).hexdigest()
        await Outcomes(nc, js, Subjects(config.prefix), "config").emit(
            EventKind.CONFIG_RELOADED, detail={"revision": revision, "sha256": digest})
    finally:
        await nc.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS considers free right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class ServiceProcess:
    """One service process the mesh supervises."""

    name: str
    module: str
    extra_args: list[str] = field(default_factory=list)
    pool: str | None = None  # set for executor workers
    http_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self, nats_url: str, prefix: str) -> list[str]:
        return [sys.executable, "-m", self.module, "--nats-url", nats_url, "--prefix", prefix,
                "--instance", self.name, "--http-port", str(self.http_port), *self.extra_args]


def audit_key_path(config: Config, data_dir: Path) -> Path:
    """The log signing key: `audit.signing_key`, else `<data-dir>/audit/log.key`."""
    return Path(config.audit.signing_key) if config.audit.signing_key else data_dir / "audit" / "log.key"


def ensure_audit_key(config: Config, data_dir: Path) -> Path:
    """The log key file, made (with its `.vkey` verifier next to it) when the default one is missing."""
    path = audit_key_path(config, data_dir)
    if not path.exists() and not config.audit.signing_key:
        write_key_pair(SigningKey.generate(f"toolbus-{config.audit.log_id}"), path)
        log.warning("audit.key_generated", path=str(path), hint="back it up; verifiers need its .vkey")
    return path


def write_key_pair(key: SigningKey, path: Path) -> None:
    """Write a signing key (owner-only) and its verifier key (`<path>` with suffix `.vkey`)."""
    key.write(path)
    path.with_suffix(".vkey").write_text(f"{key.verifier}\n")


def service_plan(config: Config, data_dir: Path = Path(".toolbus")) -> list[ServiceProcess]:
    """The processes a config asks for: the audit writers, the accountant and the context store (each
    when on), one router, and each pool's workers."""
    plan = [ServiceProcess(f"audit-{i}", "services.audit", [
        "--signing-key", str(audit_key_path(config, data_dir)), "--key-dir", str(data_dir / "audit" / "writers")])
        for i in range(1, config.audit.writers + 1)] if config.audit.enabled else []
    if config.accounting.enabled:
        plan.append(ServiceProcess("budget", "services.budget"))
    if config.context.enabled:
        plan.append(ServiceProcess("context", "services.context"))
    plan.append(ServiceProcess("router", "services.router"))
    if config.gateway.enabled:
        gateway = config.gateway
        port = gateway.port or free_port(gateway.host)  # known before the start, so runtime.json can name it
        plan.append(ServiceProcess("gateway", "services.gateway", [
            "--host", gateway.host, "--port", str(port), "--max-request-body-bytes",
            str(gateway.max_request_body_bytes), "--call-timeout-s", str(gateway.call_timeout_s)]))
    served = {server.pool for server in config.servers.values()}
    for pool, pool_config in sorted(config.pools.items()):
        if pool in served:
            plan += [ServiceProcess(f"executor-{pool}-{i}", "services.executor", ["--pool", pool], pool=pool)
                     for i in range(1, pool_config.workers + 1)]
    return plan


class Mesh:
    """Everything `toolbus up` runs, started in order and stopped in reverse."""

    def __init__(self, config: Config, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.nats: NatsServer | None = None
        self.redis: RedisServer | None = None
        self.nats_url = config.nats.url or os.environ.get("TOOLBUS_NATS_URL") or ""
        self.redis_url = config.redis.url or os.environ.get("TOOLBUS_REDIS_URL") or ""
        self.services = service_plan(config, data_dir)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self._control: NatsClient | None = None

    @property
    def runtime_file(self) -> Path:
        return self.data_dir / RUNTIME_FILE

    async def start(self) -> RuntimeInfo:
        """Start servers and services, wait until all are ready, write runtime.json."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._start_servers)
        await bootstrap(self.nats_url, self.config)
        if self.config.audit.enabled:
            ensure_audit_key(self.config, self.data_dir)
        for service in self.services:
            await self._spawn(service)
        await asyncio.gather(*(self._wait_ready(s) for s in self.services))
        self._supervisor = asyncio.create_task(self._supervise())
        await self._serve_control()
        info = self.runtime_info()
        self.runtime_file.write_text(info.model_dump_json(indent=2))
        return info

    async def stop(self) -> None:
        """Drain services (SIGTERM, bounded), then stop the servers; remove runtime.json."""
        self._stopping = True
        if self._control is not None:
            await self._control.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self.runtime_file.unlink(missing_ok=True)
        await asyncio.gather(*(self._terminate(s) for s in reversed(self.services)))
        await asyncio.to_thread(self._stop_servers)

    def runtime_info(self) -> RuntimeInfo:
        endpoints = [ServiceEndpoint(name=s.name, pid=s.process.pid if s.process else 0, http_url=s.http_url)
                     for s in self.services]
        return RuntimeInfo(nats_url=self.nats_url, redis_url=self.redis_url, gateway_url=self.gateway_url,
                           pid=os.getpid(), prefix=self.config.prefix, services=endpoints)

    @property
    def gateway_url(self) -> str | None:
        """The MCP gateway's endpoint, e.g. `http://127.0.0.1:8765/mcp` (None when it is off)."""
        gateway = next((s for s in self.services if s.module == "services.gateway"), None)
        if gateway is None:
            return None
        args = dict(zip(gateway.extra_args[::2], gateway.extra_args[1::2], strict=True))
        return f"http://{args['--host']}:{args['--port']}/mcp"

    def _start_servers(self) -> None:
        if not self.nats_url:
            self.nats = NatsServer(NatsServerSettings(data_dir=self.data_dir))
            self.nats_url = self.nats.start()
        if not self.redis_url:
            self.redis = RedisServer(RedisServerSettings(data_dir=self.data_dir))
            self.redis_url = self.redis.start()

    def _stop_servers(self) -> None:
        for server in (self.redis, self.nats):
            if server is not None:
                server.stop()

    async def _spawn(self, service: ServiceProcess) -> None:
        log_file = (self.data_dir / "logs" / f"{service.name}.log").open("ab")
        env = {**os.environ, "TOOLBUS_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1"}
        service.process = await asyncio.create_subprocess_exec(
            *service.argv(self.nats_url, self.config.prefix), stdout=log_file, stderr=log_file, env=env
        )
        log_file.close()  # the child holds its own descriptor

    async def _wait_ready(self, service: ServiceProcess) -> None:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while not await http_ok(service.http_url + "/readyz"):
                if service.process is not None and service.process.returncode is not None:
                    raise RuntimeError(f"{service.name} exited with {service.process.returncode} before it was "
                                       f"ready; see {self.data_dir / 'logs' / service.name}.log")
                await asyncio.sleep(0.1)

    async def _supervise(self) -> None:
        """Restart any service process that dies on its own (bounded backoff)."""
        while not self._stopping:
            self._changed.clear()
            waits = {asyncio.create_task(s.process.wait()): s for s in self.services if s.process}
            changed = asyncio.create_task(self._changed.wait())
            try:
                done, _ = await asyncio.wait([*waits, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in [*waits, changed]:
                    task.cancel()
            for task in done - {changed}:
                await self._restart(waits[task], task.result())

    async def _restart(self, service: ServiceProcess, code: int) -> None:
        if service not in self.services or self._stopping:
            return  # scaled down on purpose
        service.restarts += 1
        log.warning("mesh.service_died", service=service.name, code=code, restarts=service.restarts)
        await asyncio.sleep(min(0.2 * 2 ** min(service.restarts, 5), 5.0))
        await self._spawn(service)

    async def scale(self, request: ScaleRequest) -> ScaleReply:
        """Start or drain local worker processes of a pool until it has `request.workers`."""
        if request.pool not in self.config.pools:
            return ScaleReply(pool=request.pool, before=0, after=0, error=f"no pool named {request.pool!r}")
        workers = [s for s in self.services if s.pool == request.pool]
        before = len(workers)
        if request.workers > before:
            await self._add_workers(request.pool, request.workers - before, workers)
        leaving = workers[request.workers:]
        for service in leaving:
            self.services.remove(service)
        await asyncio.gather(*(self._terminate(service) for service in leaving))  # each drains first
        self._changed.set()
        log.info("mesh.scaled", pool=request.pool, before=before, after=request.workers)
        return ScaleReply(pool=request.pool, before=before, after=request.workers)

    async def _add_workers(self, pool: str, count: int, existing: list[ServiceProcess]) -> None:
        taken = {s.name for s in self.services}
        names = (f"executor-{pool}-{i}" for i in range(1, 1000) if f"executor-{pool}-{i}" not in taken)
        added = [ServiceProcess(next(names), "services.executor", ["--pool", pool], pool=pool) for _ in range(count)]
        self.services.extend(added)
        for service in added:
            await self._spawn(service)
        await asyncio.gather(*(self._wait_ready(s) for s in added))

    async def _serve_control(self) -> None:
        """Answer `toolbus.mesh.scale` requests from `toolbus scale`."""
        nc = await connect(self.nats_url, name="toolbus-mesh")
        self._control = nc

        async def on_scale(msg: Msg) -> None:
            try:
                reply = await self.scale(ScaleRequest.model_validate_json(msg.data))
            except ValidationError as error:
                reply = ScaleReply(pool="", before=0, after=0, error=str(error))
            await msg.respond(reply.model_dump_json().encode())

        await nc.subscribe(Subjects(self.config.prefix).mesh("scale"), cb=on_scale)

    @staticmethod
    async def _terminate(service: ServiceProcess) -> None:
        process = service.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()


async def http_ok(url: str) -> bool:
    """True when GET `url` answers 200 (used for /readyz)."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n".encode())
    status = await reader.readline()
    writer.close()
    return status.split()[1:2] == [b"200"]

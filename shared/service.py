"""What every service process shares: health/metrics endpoints, signals, drain on SIGTERM.

A service is an object with `start()`, `stop()` and a `ready` flag; `run_service` gives it
logs, traces, `/healthz`, `/readyz`, `/metrics` and a clean exit on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.subjects import DEFAULT_PREFIX
from shared.telemetry import configure_logging, configure_tracing

log = structlog.get_logger(__name__)


class Service(Protocol):
    """A long-running service: started once, stopped (drained) once."""

    name: str

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class BackgroundTasks:
    """The tasks a service starts beside its main work (watches, timers, request answers), stopped together."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout_s: float) -> None:
        """Cancel every task and wait (bounded) for them to end."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)


async def serve_requests(nc: NatsClient, subject: str, queue: str, tasks: BackgroundTasks,
                         answer: Callable[[Msg], Awaitable[None]]) -> None:
    """Answer core-NATS requests on `subject` (queue group `queue`), each in its own task, not one at a time."""

    async def on_request(msg: Msg) -> None:
        tasks.spawn(answer(msg))

    await nc.subscribe(subject, queue=queue, cb=on_request)


@dataclass(frozen=True)
class HttpSettings:
    """Where a service's health and metrics endpoints listen (port 0: the OS picks)."""

    host: str = "127.0.0.1"
    port: int = 0


class HealthServer:
    """A minimal HTTP/1.1 server for `/healthz`, `/readyz` and `/metrics` (GET only)."""

    def __init__(self, settings: HttpSettings, is_ready: Callable[[], bool]) -> None:
        self._settings = settings
        self._is_ready = is_ready
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:40123`."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._settings.host, self._settings.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] == "GET" else ""
            status, content_type, body = self._route(path)
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._is_ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"starting\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        return "404 Not Found", "text/plain", b"not found\n"


async def serve(service: Service, http: HttpSettings) -> None:
    """Run a service until SIGTERM/SIGINT, then drain it and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    health = HealthServer(http, lambda: service.ready)
    await health.start()
    log.info("service.http", url=health.url)
    try:
        await service.start()
        log.info("service.started")
        await stop.wait()
        log.info("service.draining")
    finally:
        await service.stop()
        await health.stop()
        log.info("service.stopped")


def run_service(service: Service, http: HttpSettings) -> None:
    """Entry point body of `python -m services.<name>`."""
    configure_logging(service.name)
    configure_tracing(service.name)
    asyncio.run(serve(service, http))


@dataclass(frozen=True)
class CommonArgs:
    """Options every service process takes (flags, else `TOOLBUS_*` environment variables)."""

    nats_url: str
    prefix: str
    instance: str
    http: HttpSettings


def common_parser(service: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every service shares."""
    env = os.environ.get
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=description)
    parser.add_argument("--nats-url", default=env("TOOLBUS_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--prefix", default=env("TOOLBUS_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--instance", default=f"{service}-{os.getpid()}", help="name in logs and events")
    parser.add_argument("--http-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0, help="health/metrics port (0: any free port)")
    return parser


def common_args(namespace: argparse.Namespace) -> CommonArgs:
    """The shared options out of a parsed namespace."""
    return CommonArgs(
        nats_url=namespace.nats_url,
        prefix=namespace.prefix,
        instance=namespace.instance,
        http=HttpSettings(namespace.http_host, namespace.http_port),
    )

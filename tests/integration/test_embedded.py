"""Integration tests for shared.embedded against the real nats-server and redis-server."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from shared.embedded import (
    EmbeddedError,
    NatsServer,
    NatsServerSettings,
    RedisServer,
    RedisServerSettings,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started nats-server on a random port, always stopped afterwards."""
    server = NatsServer(NatsServerSettings(data_dir=tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server on a free port, always stopped afterwards."""
    server = RedisServer(RedisServerSettings(data_dir=tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _port_accepts(host: str, port: int) -> bool:
    """Whether a TCP connect to host:port currently succeeds."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _jetstream_account_ok(url: str) -> bool:
    """Connect to nats and ask JetStream for account info."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        info = await nc.jetstream().account_info()
        return info is not None
    finally:
        await nc.close()


async def _add_stream_and_publish(url: str) -> None:
    """Create a file-backed stream and store one message in it."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED", subjects=["embedded.>"])
        await js.publish("embedded.one", b"persisted")
    finally:
        await nc.close()


async def _read_stream(url: str) -> tuple[int, bytes | None]:
    """Return the stream's message count and its first message payload."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EMBEDDED")
        msg = await js.get_msg("EMBEDDED", seq=1)
        return info.state.messages, msg.data
    finally:
        await nc.close()


async def _redis_roundtrip(
    url: str, key: str, value: str | None
) -> tuple[str, str | None]:
    """Ping redis, optionally SET key, and return (appendonly setting, GET key)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        assert await client.ping()
        if value is not None:
            await client.set(key, value)
        config = await client.config_get("appendonly")
        stored = await client.get(key)
        return str(config["appendonly"]), None if stored is None else str(stored)
    finally:
        await client.aclose()


def test_nats_starts_with_jetstream_and_stop_closes_port(tmp_path: Path) -> None:
    """nats-server starts on a free port with JetStream enabled and stop() closes the port."""
    server = NatsServer(NatsServerSettings(data_dir=tmp_path))
    url = server.start()
    try:
        assert url == f"nats://127.0.0.1:{server.port}"
        assert server.port > 0
        assert asyncio.run(_jetstream_account_ok(url))
    finally:
        server.stop()
    assert server.pid is None
    assert not _port_accepts("127.0.0.1", server.port)


def test_nats_restart_keeps_port_and_jetstream_data(nats_server: NatsServer) -> None:
    """restart() brings nats back on the same port with its JetStream stream and messages."""
    port_before = nats_server.port
    asyncio.run(_add_stream_and_publish(nats_server.url))
    url = nats_server.restart()
    assert nats_server.port == port_before
    assert asyncio.run(_read_stream(url)) == (1, b"persisted")


def test_nats_kill_ends_process_at_once(nats_server: NatsServer) -> None:
    """kill() ends the nats-server process immediately and leaves no live pid."""
    pid = nats_server.pid
    assert pid is not None
    nats_server.kill()
    assert nats_server.pid is None
    assert not _pid_alive(pid)


def test_nats_restart_after_kill_serves_again(nats_server: NatsServer) -> None:
    """restart() after kill() serves clients again on the same port."""
    port_before = nats_server.port
    nats_server.kill()
    url = nats_server.restart()
    assert nats_server.port == port_before
    assert asyncio.run(_jetstream_account_ok(url))


def test_redis_starts_with_appendonly_and_keeps_data_across_restart(
    redis_server: RedisServer,
) -> None:
    """redis-server answers PING with appendonly on and a SET value survives restart()."""
    url = redis_server.url
    assert url == f"redis://127.0.0.1:{redis_server.port}/0"
    appendonly, _ = asyncio.run(_redis_roundtrip(url, "toolbus:key", "kept"))
    assert appendonly == "yes"
    assert redis_server.restart() == url
    _, value = asyncio.run(_redis_roundtrip(url, "toolbus:key", None))
    assert value == "kept"


def test_nats_on_taken_port_raises_embedded_error_with_log(tmp_path: Path) -> None:
    """Starting nats on a port held by another listener raises EmbeddedError with log text in time."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = int(blocker.getsockname()[1])
        server = NatsServer(NatsServerSettings(data_dir=tmp_path, port=port))
        started = time.monotonic()
        with pytest.raises(EmbeddedError) as excinfo:
            server.start(timeout=10.0)
        assert time.monotonic() - started < 10.0
    assert "address already in use" in str(excinfo.value).lower()
    assert server.pid is None


def test_context_manager_stops_redis_on_exit(tmp_path: Path) -> None:
    """Leaving the RedisServer context stops the process."""
    with RedisServer(RedisServerSettings(data_dir=tmp_path)) as server:
        pid = server.pid
        assert pid is not None
    assert server.pid is None
    assert not _pid_alive(pid)

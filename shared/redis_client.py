"""Redis connections that survive a Redis restart (plumbing shared by executors and the accountant)."""

from __future__ import annotations

from importlib.resources import files

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_CONNECTIONS = 64


def redis_client(url: str, *, timeout_s: float = 2.0, retries: int = 5, decode: bool = True) -> Redis:
    """A Redis client with short timeouts, retries with backoff, and a bounded pool that waits.

    redis-py 8 does not retry by default, so after a restart the first command on each pooled
    connection would fail. Every script toolbus runs is idempotent, so a command retried after
    a lost reply is harmless. Its default pool raises once 100 connections are in use; a
    blocking pool makes a burst of concurrent calls queue for a connection instead.
    `decode=False` returns bytes, for values that are not text (msgpack).
    """
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout_s, decode_responses=decode, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


def bundled_script(package: str, name: str) -> str:
    """The text of a Redis Lua script shipped in `<package>/lua/<name>.lua` (package data)."""
    return (files(package) / "lua" / f"{name}.lua").read_text()

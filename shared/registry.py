"""The `toolbus-registry` KV bucket: the live config and every backend tool's spec.

`toolbus up` (and later hot reload) writes `config`; each executor writes `tools.<public name>`
for the tools its backends list; the budget accountant writes `budget.limits` (limits set at
runtime) and `budget.epoch`. Routers keep a local copy current with a KV watch, so a new
executor's tools are callable as soon as they are registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.codec import dump_model_json
from shared.config import Config, config_to_json, parse_config
from shared.contracts import SetLimitRequest, ToolSpec, WorkerBeat
from shared.subjects import REGISTRY_BUCKET, WORKERS_BUCKET

log = structlog.get_logger(__name__)

CONFIG_KEY = "config"
BUDGET_LIMITS_KEY = "budget.limits"  # JSON list of SetLimitRequest: the limits set at runtime
BUDGET_EPOCH_KEY = "budget.epoch"  # the epoch Redis must hold while its budget counters are whole
STOP_WATCH_S = 2.0
TOOL_KEY_PREFIX = "tools."


def tool_key(public_name: str) -> str:
    """KV key of one tool's spec."""
    return f"{TOOL_KEY_PREFIX}{public_name}"


class RegistryNotReady(RuntimeError):
    """The registry has no config yet: run `toolbus up` or publish one first."""


class Registry:
    """Typed access to the registry bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, create: bool = False, replicas: int = 1) -> Registry:
        """Bind the bucket; create it (history 5, file storage) when `create` is set."""
        try:
            return cls(await js.key_value(REGISTRY_BUCKET))
        except BucketNotFoundError:
            if not create:
                raise RegistryNotReady(f"KV bucket {REGISTRY_BUCKET!r} does not exist") from None
        config = KeyValueConfig(bucket=REGISTRY_BUCKET, history=5, storage=StorageType.FILE, replicas=replicas)
        return cls(await js.create_key_value(config))

    async def put_config(self, config: Config) -> int:
        """Publish the config; its KV revision."""
        return int(await self._kv.put(CONFIG_KEY, config_to_json(config)))

    async def get_config(self) -> Config:
        try:
            entry = await self._kv.get(CONFIG_KEY)
        except KeyNotFoundError:
            raise RegistryNotReady("no config published in the registry yet") from None
        return parse_config(json.loads(entry.value or b"{}"), source=f"kv:{REGISTRY_BUCKET}/{CONFIG_KEY}")

    async def put_tool(self, spec: ToolSpec) -> None:
        await self._kv.put(tool_key(spec.public_name), dump_model_json(spec))

    async def tools(self) -> dict[str, ToolSpec]:
        """Every registered tool by public name."""
        try:
            keys = await self._kv.keys()
        except NoKeysError:  # an empty bucket
            return {}
        specs = await asyncio.gather(*(self._kv.get(k) for k in keys if k.startswith(TOOL_KEY_PREFIX)))
        return {s.public_name: s for s in (ToolSpec.model_validate_json(e.value or b"") for e in specs)}

    async def watch(
        self, on_tool: Callable[[ToolSpec], None], on_config: Callable[[Config], None],
        on_budget_limits: Callable[[list[SetLimitRequest]], None] | None = None,
    ) -> None:
        """Call back on every current and future tool, config and runtime-limits entry until cancelled."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None or not entry.value:
                    continue  # end of initial values, or a delete marker
                if entry.key == BUDGET_LIMITS_KEY and on_budget_limits is not None:
                    on_budget_limits(parse_budget_limits(entry.value))
                    continue
                self._dispatch(entry.key, entry.value, on_tool, on_config)
        finally:
            with contextlib.suppress(Exception):  # bounded: nats-py's stop can hang on a busy connection
                await asyncio.wait_for(watcher.stop(), STOP_WATCH_S)  # type: ignore[no-untyped-call]

    @staticmethod
    def _dispatch(
        key: str, value: bytes, on_tool: Callable[[ToolSpec], None], on_config: Callable[[Config], None]
    ) -> None:
        try:
            if key.startswith(TOOL_KEY_PREFIX):
                on_tool(ToolSpec.model_validate_json(value))
            elif key == CONFIG_KEY:
                on_config(parse_config(json.loads(value), source=f"kv:{REGISTRY_BUCKET}/{CONFIG_KEY}"))
        except Exception:
            log.exception("registry.bad_entry", key=key)  # one bad entry must not stop the watch


def parse_budget_limits(raw: bytes | None) -> list[SetLimitRequest]:
    """The runtime limits stored under `budget.limits`."""
    return [SetLimitRequest.model_validate(item) for item in json.loads(raw or b"[]")]


BEAT_TTL_S = 10.0  # a worker silent this long is gone from `toolbus status`
BEAT_EVERY_S = 3.0


class WorkerRoster:
    """The `toolbus-workers` KV bucket: one expiring heartbeat entry per live worker."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> WorkerRoster:
        """Bind the bucket, creating it (memory storage, entries expire) when missing."""
        try:
            return cls(await js.key_value(WORKERS_BUCKET))
        except BucketNotFoundError:
            config = KeyValueConfig(bucket=WORKERS_BUCKET, history=1, ttl=BEAT_TTL_S,
                                    storage=StorageType.MEMORY, replicas=replicas)
            return cls(await js.create_key_value(config))

    async def beat(self, beat: WorkerBeat) -> None:
        await self._kv.put(f"{beat.pool}.{beat.instance}", dump_model_json(beat))

    async def leave(self, pool: str, instance: str) -> None:
        """Remove a stopping worker at once instead of waiting for its entry to expire."""
        await self._kv.delete(f"{pool}.{instance}")

    async def beats(self) -> list[WorkerBeat]:
        """Every live worker's last heartbeat."""
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        entries = await asyncio.gather(*(self._kv.get(key) for key in keys), return_exceptions=True)
        return [WorkerBeat.model_validate_json(e.value) for e in entries
                if not isinstance(e, BaseException) and e.value]

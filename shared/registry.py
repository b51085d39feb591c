"""The `toolbus-registry` KV bucket: the live config and every backend tool's spec.

`toolbus up` (and later hot reload) writes `config`; each executor writes `tools.<public name>`
for the tools its backends list, and `prompts.…`, `resources.…`, `templates.…` for the rest of
their catalog (and deletes what a backend stopped offering); the budget accountant writes `budget.limits` (limits set at
runtime) and `budget.epoch`. Routers keep a local copy current with a KV watch, so a new
executor's tools are callable as soon as they are registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.codec import dump_model_json
from shared.config import Config, config_to_json, parse_config
from shared.contracts import CatalogEntry, CatalogKind, SetLimitRequest, ToolSpec, WorkerBeat
from shared.subjects import REGISTRY_BUCKET, WORKERS_BUCKET

log = structlog.get_logger(__name__)

CONFIG_KEY = "config"
BUDGET_LIMITS_KEY = "budget.limits"  # JSON list of SetLimitRequest: the limits set at runtime
BUDGET_EPOCH_KEY = "budget.epoch"  # the epoch Redis must hold while its budget counters are whole
STOP_WATCH_S = 2.0
TOOL_KEY_PREFIX = "tools."
CATALOG_KEY_PREFIXES = {kind: f"{kind.value}s." for kind in CatalogKind}


def tool_key(public_name: str) -> str:
    """KV key of one tool's spec."""
    return f"{TOOL_KEY_PREFIX}{public_name}"


def tool_named_by(key: str) -> str | None:
    """The public name of the tool a KV key holds, None for any other key."""
    return key.removeprefix(TOOL_KEY_PREFIX) if key.startswith(TOOL_KEY_PREFIX) else None


def catalog_key(kind: CatalogKind, server: str, identity: str) -> str:
    """KV key of a prompt, resource or template: `<kind>s.<server>.<digest>`.

    A digest, because a resource's URI or name may hold characters a KV key cannot; the server
    in the key lets an executor find (and delete) what its backend stopped offering.
    """
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return f"{CATALOG_KEY_PREFIXES[kind]}{server}.{digest}"


def entry_key(entry: CatalogEntry) -> str:
    identity = entry.uri if entry.kind is CatalogKind.RESOURCE and entry.uri is not None else entry.name
    return catalog_key(entry.kind, entry.server, identity)


@dataclass(frozen=True)
class RegistryWatch:
    """What a service follows in the registry; the callbacks it does not need stay None."""

    on_config: Callable[[Config], None]
    on_tool: Callable[[ToolSpec], None] | None = None
    on_budget_limits: Callable[[list[SetLimitRequest]], None] | None = None
    on_entry: Callable[[str, CatalogEntry], None] | None = None  # prompts, resources, templates by key
    on_removed: Callable[[str], None] | None = None  # the KV key of a tool or catalog entry deleted


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
        values = await self._values(TOOL_KEY_PREFIX)
        return {s.public_name: s for s in (ToolSpec.model_validate_json(v) for v in values.values())}

    async def put_entry(self, entry: CatalogEntry) -> str:
        """Publish a prompt, resource or template; its KV key."""
        key = entry_key(entry)
        await self._kv.put(key, dump_model_json(entry))
        return key

    async def catalog(self) -> dict[str, CatalogEntry]:
        """Every registered prompt, resource and template by KV key."""
        values = await self._values(*CATALOG_KEY_PREFIXES.values())
        return {key: CatalogEntry.model_validate_json(value) for key, value in values.items()}

    async def remove_stale(self, server: str, current: set[str]) -> list[str]:
        """Delete the tools and catalog entries of `server` whose keys are not in `current`."""
        stale = [tool_key(name) for name, spec in (await self.tools()).items() if spec.server == server]
        stale += [key for key, entry in (await self.catalog()).items() if entry.server == server]
        removed = [key for key in stale if key not in current]
        for key in removed:
            await self._kv.delete(key)
        return removed

    async def _values(self, *prefixes: str) -> dict[str, bytes]:
        """The entries whose keys start with any of `prefixes` (one key listing, reads in parallel)."""
        try:
            keys = await self._kv.keys()
        except NoKeysError:  # an empty bucket
            return {}
        wanted = [key for key in keys if key.startswith(prefixes)]
        entries = await asyncio.gather(*(self._kv.get(key) for key in wanted), return_exceptions=True)
        # an entry deleted between listing and reading is simply gone
        return {key: e.value for key, e in zip(wanted, entries, strict=True) if not isinstance(e, BaseException)
                and e.value}

    async def watch(self, follow: RegistryWatch) -> None:
        """Call back on every current and future entry `follow` asks for, until cancelled."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue  # end of initial values
                if not entry.value:  # a delete (or purge) marker
                    if follow.on_removed is not None and entry.key != CONFIG_KEY:
                        follow.on_removed(entry.key)
                    continue
                self._dispatch(entry.key, entry.value, follow)
        finally:
            with contextlib.suppress(Exception):  # bounded: nats-py's stop can hang on a busy connection
                await asyncio.wait_for(watcher.stop(), STOP_WATCH_S)  # type: ignore[no-untyped-call]

    @staticmethod
    def _dispatch(key: str, value: bytes, follow: RegistryWatch) -> None:
        try:
            if key.startswith(TOOL_KEY_PREFIX):
                if follow.on_tool is not None:
                    follow.on_tool(ToolSpec.model_validate_json(value))
            elif key == CONFIG_KEY:
                follow.on_config(parse_config(json.loads(value), source=f"kv:{REGISTRY_BUCKET}/{CONFIG_KEY}"))
            elif key == BUDGET_LIMITS_KEY:
                if follow.on_budget_limits is not None:
                    follow.on_budget_limits(parse_budget_limits(value))
            elif key.startswith(tuple(CATALOG_KEY_PREFIXES.values())) and follow.on_entry is not None:
                follow.on_entry(key, CatalogEntry.model_validate_json(value))
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

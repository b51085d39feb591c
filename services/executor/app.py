"""Executor service: one worker process of a pool.

Wiring only: connections, backends, the priority intake, cancellation and heartbeats. What
happens to each call is in `runner.py`; how calls are taken by priority, in `intake.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from pydantic import ValidationError
from redis.asyncio import Redis

from services.executor.backends import Backend
from services.executor.breaker import SharedBreaker
from services.executor.catalog import catalog_entries, tool_spec
from services.executor.intake import IntakeSettings, PriorityIntake
from services.executor.ledger import CallLedger
from services.executor.relay import CallerRelay
from services.executor.runner import CallRunner, Worker
from services.executor.watch import UpdatePublisher
from shared.budget_client import BudgetClient
from shared.bus import connect, ensure_consumer, provision_streams
from shared.codec import unpack
from shared.config import Config, PoolConfig
from shared.contracts import BreakerView, WorkerBeat, WorkItem
from shared.outcomes import Outcomes, now_ms
from shared.redis_client import redis_client
from shared.registry import BEAT_EVERY_S, Registry, WorkerRoster, tool_key
from shared.subjects import DEFAULT_PREFIX, Stream, Subjects, work_durable
from shared.telemetry import call_span

log = structlog.get_logger(__name__)

BACKEND_START_TIMEOUT_S = 20.0
PRIORITIES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ExecutorSettings:
    """Which pool this worker serves and where the bus and Redis are."""

    nats_url: str
    pool: str = "default"
    prefix: str = DEFAULT_PREFIX
    instance: str = "executor"
    redis_url: str = "redis://127.0.0.1:6379/0"


class ExecutorService:
    """Runs the calls routed to one pool, on warm sessions to that pool's backends."""

    name = "executor"

    def __init__(self, settings: ExecutorSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._redis: Redis | None = None
        self._worker: Worker | None = None
        self._runner: CallRunner | None = None
        self._intake: PriorityIntake | None = None
        self._cancels: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._started_at_ms = now_ms()

    @property
    def ready(self) -> bool:
        return self._intake is not None

    @property
    def worker(self) -> Worker:
        assert self._worker is not None, "not started"
        return self._worker

    async def start(self) -> None:
        """Connect, start the pool's backends, register their tools, start taking calls."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        js = self._nc.jetstream()
        registry = await Registry.open(js, create=True)
        config = await registry.get_config()
        await provision_streams(js, self._subjects, replicas=config.nats.replicas)  # never downgrade R3 to R1
        self._worker = await self._make_worker(js, config)
        self._runner = CallRunner(self._worker)
        await self._start_backends(config, registry)
        self._cancels = await self._nc.subscribe(self._subjects.cancel("*"), cb=self._on_cancel)
        await self._start_intake()
        roster = await WorkerRoster.open(js)
        self._heartbeat = asyncio.create_task(self._beat_forever(roster))

    async def stop(self) -> None:
        """Drain: stop taking calls, finish in-flight ones (bounded), then close everything."""
        if self._intake is not None:
            await self._intake.stop(drain_timeout=self.worker.pool.timeout_s)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            with contextlib.suppress(Exception):
                roster = await WorkerRoster.open(self.worker.js)
                await roster.leave(self._settings.pool, self._settings.instance)
        if self._worker is not None:
            await asyncio.gather(*(backend.stop() for backend in self._worker.backends.values()))
        if self._redis is not None:
            await self._redis.aclose()
        if self._nc is not None:
            await self._nc.close()  # consumers are already stopped and every publish was acked

    async def _make_worker(self, js: JetStreamContext, config: Config) -> Worker:
        pool = config.pools[self._settings.pool]
        self._redis = redis_client(self._settings.redis_url)
        servers = [name for name, server in config.servers.items() if server.pool == self._settings.pool]
        breakers = {name: SharedBreaker(self._redis, pool=self._settings.pool, backend=name, config=pool.breaker,
                                        key_prefix=self._settings.prefix) for name in servers}
        assert self._nc is not None
        return Worker(
            instance=self._settings.instance, pool_name=self._settings.pool, pool=pool, subjects=self._subjects,
            js=js, outcomes=Outcomes(self._nc, js, self._subjects, source=self._settings.instance),
            ledger=CallLedger(self._redis, prefix=self._settings.prefix, claim_ttl_s=pool.ack_wait_s),
            backends={}, breakers=breakers,
            budget=BudgetClient(self._nc, self._subjects, config.accounting.timeout_s)
            if config.accounting.enabled else None,
            settle_margin_s=config.accounting.settle_margin_s,
        )

    async def _start_backends(self, config: Config, registry: Registry) -> None:
        """Start every backend of the pool; each registers its tools whenever it (re)connects.

        A backend that is down at start does not stop the worker: its calls are retried and
        its tools appear once it connects.
        """

        async def register(backend: Backend) -> None:
            await self._register_tools(registry, config, backend)

        assert self._nc is not None
        updates = UpdatePublisher(self._nc, self._subjects)  # listed resources' updates, for the gateway
        backends = {n: Backend(n, s, register, relay=CallerRelay(self._nc, self._subjects), resource_updates=updates)
                    for n, s in config.servers.items() if s.pool == self._settings.pool}
        self.worker.backends.update(backends)
        if not backends:
            log.warning("executor.no_backends", pool=self._settings.pool)
        await asyncio.gather(*(backend.start() for backend in backends.values()))
        waits = [asyncio.wait_for(b.registered.wait(), BACKEND_START_TIMEOUT_S) for b in backends.values()]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for backend, result in zip(backends.values(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("executor.backend_not_ready", backend=backend.name, error=repr(result))

    async def _register_tools(self, registry: Registry, config: Config, backend: Backend) -> None:
        """Publish the backend's tools (name, description, schemas) so routers can validate calls,
        and its prompts, resources and templates; then delete what it no longer offers."""
        current: set[str] = set()
        for tool in await backend.list_tools():
            spec = tool_spec(config, backend.name, self._settings.pool, tool)
            await registry.put_tool(spec)
            current.add(tool_key(spec.public_name))
        for entry in catalog_entries(config, backend.name, self._settings.pool, await backend.catalog()):
            current.add(await registry.put_entry(entry))
        removed = await registry.remove_stale(backend.name, current)
        log.info("executor.tools_registered", backend=backend.name, entries=len(current), removed=len(removed))

    async def _start_intake(self) -> None:
        pool = self.worker.pool
        for priority in PRIORITIES:
            await ensure_consumer(self.worker.js, Stream.WORK, self._consumer_config(pool, priority))
        settings = IntakeSettings(
            stream=Stream.WORK.value,
            durables=tuple(work_durable(self._settings.pool, p) for p in PRIORITIES),
            concurrency=pool.concurrency,
            starvation_share=pool.starvation_share,
        )
        assert self._nc is not None
        self._intake = PriorityIntake(self._nc, settings, self.execute_call)
        await self._intake.start()

    def _consumer_config(self, pool: PoolConfig, priority: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=work_durable(self._settings.pool, priority),
            filter_subject=self._subjects.work(self._settings.pool, priority),
            ack_wait=pool.ack_wait_s,
            max_deliver=-1,  # the executor dead-letters by itself, so no call is ever dropped silently
            max_ack_pending=pool.concurrency * max(1, pool.workers) * 4,
        )

    async def execute_call(self, msg: Msg, priority: int) -> None:
        """Decode one routed call and hand it to the runner."""
        try:
            work = unpack(WorkItem, msg.data)
        except (ValidationError, ValueError) as error:
            log.error("executor.bad_work_item", error=str(error), priority=priority)
            await msg.term()  # it can never be run; the router's events still hold the call
            return
        assert self._runner is not None
        with call_span("executor.execute", msg.headers, work.call_id):
            await self._runner.handle(msg, work)

    async def _on_cancel(self, msg: Msg) -> None:
        """`toolbus.cancel.<call_id>`: stop it here if it runs here; remember it for whoever reaches it."""
        call_id = msg.subject.rsplit(".", 1)[-1]
        assert self._runner is not None
        with contextlib.suppress(Exception):
            await self.worker.ledger.cancel(call_id)
        if self._runner.cancel(call_id):
            log.info("call.cancel_requested", call_id=call_id)

    async def _beat_forever(self, roster: WorkerRoster) -> None:
        while True:
            with contextlib.suppress(Exception):
                await roster.beat(await self._beat())
            await asyncio.sleep(BEAT_EVERY_S)

    async def _beat(self) -> WorkerBeat:
        views = {}
        for name, breaker in self.worker.breakers.items():
            snap = await breaker.snapshot()
            views[name] = BreakerView(state=snap.state.value, failures=snap.failures,
                                      retry_after_ms=snap.retry_after_ms)
        return WorkerBeat(
            instance=self._settings.instance, pool=self._settings.pool, pid=os.getpid(),
            concurrency=self.worker.pool.concurrency,
            in_flight=self._intake.in_flight if self._intake else 0,
            backends={name: b.registered.is_set() for name, b in self.worker.backends.items()},
            breakers=views, started_at_ms=self._started_at_ms, beat_at_ms=now_ms(),
        )

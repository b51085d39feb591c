"""Budget service: answers `toolbus.budget.<verb>` requests (queue group `budget`) and reaps holds.

Wiring only: connections, the epoch handshake, subscriptions, the reaper and the rebuild. The
arithmetic is in `accountant.py` (Redis scripts), the rules in `operations.py`.

Epoch: the registry KV holds `budget.epoch`, and Redis holds the same value while its counters
are whole. Every reserve checks it inside the Lua script, so a Redis that restarted empty is
caught on the very next call, which is refused until `toolbus budget rebuild` restores the
counters from the ledger and writes the epoch back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from services.budget.accountant import Accountant
from services.budget.ledger import fold, read_ledger, write_folded
from services.budget.limits import LimitBook, load_overrides, store_override
from services.budget.operations import Books, BudgetOperations, Clock, new_epoch
from shared.bus import connect, provision_streams
from shared.codec import pack, unpack
from shared.config import BUDGET_SCOPE_KINDS, Config
from shared.contracts import (
    AdminReply,
    EventKind,
    LedgerReply,
    RebuildRequest,
    ReleaseRequest,
    ReserveReply,
    ReserveRequest,
    SetLimitRequest,
    SettleRequest,
    StatusReply,
    StatusRequest,
)
from shared.outcomes import Outcomes, now_ms
from shared.redis_client import redis_client
from shared.registry import BUDGET_EPOCH_KEY, Registry, RegistryWatch
from shared.service import BackgroundTasks, serve_requests
from shared.subjects import DEFAULT_PREFIX, REGISTRY_BUCKET, Subjects

log = structlog.get_logger(__name__)

OPS = Counter("toolbus_budget_ops_total", "Budget operations answered", ["verb", "outcome"])
OP_SECONDS = Histogram("toolbus_budget_op_seconds", "Time to answer one budget request", ["verb"],
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0))
QUEUE = "budget"
REAP_EVERY_S = 0.5
EPOCH_CHECK_EVERY_S = 1.0
STOP_TASKS_S = 5.0
Handler = Callable[[bytes], Awaitable[BaseModel]]


@dataclass(frozen=True)
class BudgetSettings:
    """Where the accountant connects, and its clock (tests inject one)."""

    nats_url: str
    prefix: str = DEFAULT_PREFIX
    instance: str = "budget"
    redis_url: str = "redis://127.0.0.1:6379/0"
    clock: Clock = field(default=now_ms)


class BudgetService:
    """The budget accountant: reserve, settle, release, status, set and rebuild over NATS."""

    name = "budget"

    def __init__(self, settings: BudgetSettings) -> None:
        self._settings = settings
        self._subjects = Subjects(settings.prefix)
        self._nc: NatsClient | None = None
        self._redis: Redis | None = None
        self._kv: KeyValue | None = None
        self.ops: BudgetOperations | None = None
        self._outcomes: Outcomes | None = None
        self._tasks = BackgroundTasks()
        self._rebuilding = asyncio.Lock()
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Connect, load limits, agree on the epoch with Redis, then answer requests."""
        self._nc = await connect(self._settings.nats_url, name=self._settings.instance)
        js = self._nc.jetstream()
        registry = await Registry.open(js, create=True)
        config = await registry.get_config()
        await provision_streams(js, self._subjects, replicas=config.nats.replicas)
        self._kv = await js.key_value(REGISTRY_BUCKET)
        self._redis = redis_client(self._settings.redis_url, timeout_s=1.0, retries=1)
        books = Books(config, LimitBook(config.budgets, await load_overrides(self._kv)))
        self._outcomes = Outcomes(self._nc, js, self._subjects, source=self._settings.instance)
        accountant = Accountant(self._redis, config.prefix)
        self.ops = BudgetOperations(accountant, books, self._outcomes.emit, self._settings.clock)
        await self._check_epoch()
        handlers: dict[str, Handler] = {
            "reserve": self._reserve, "settle": self._settle, "release": self._release,
            "status": self._status, "set": self._set_limit, "rebuild": self._rebuild,
        }
        for verb, handler in handlers.items():
            await serve_requests(self._nc, self._subjects.budget(verb), QUEUE, self._tasks,
                                 partial(self._answer, verb, handler))
        self._tasks.spawn(self._every(REAP_EVERY_S, self._reap))
        self._tasks.spawn(self._every(EPOCH_CHECK_EVERY_S, self._recheck_epoch))
        self._tasks.spawn(registry.watch(RegistryWatch(self._on_config, on_budget_limits=self._on_budget_limits)))
        self._ready = True

    async def stop(self) -> None:
        """Stop answering, let answers in flight finish, disconnect."""
        self._ready = False
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()  # unsubscribes, then waits for the callbacks in flight
        await self._tasks.stop(STOP_TASKS_S)
        if self._redis is not None:
            await self._redis.aclose()

    # --- request handling --------------------------------------------------------------------

    async def _answer(self, verb: str, handler: Handler, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            reply = await handler(msg.data)
        except ValidationError as error:
            reply = AdminReply(ok=False, message=f"bad {verb} request: {error.errors()[0]['msg']}")
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception("budget.request_failed", verb=verb, correlation_id=correlation_id)
            reply = AdminReply(ok=False, message=f"internal error (correlation id {correlation_id})")
        OPS.labels(verb, _outcome(reply)).inc()
        OP_SECONDS.labels(verb).observe(time.perf_counter() - started)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(pack(reply))

    @property
    def _ops(self) -> BudgetOperations:
        assert self.ops is not None, "not started"
        return self.ops

    async def _reserve(self, data: bytes) -> ReserveReply:
        return await self._ops.reserve(unpack(ReserveRequest, data))

    async def _settle(self, data: bytes) -> LedgerReply:
        async with self._rebuilding:  # a settle during a rebuild waits for it, so the rebuild cannot miss it
            return await self._ops.settle(unpack(SettleRequest, data))

    async def _release(self, data: bytes) -> LedgerReply:
        async with self._rebuilding:
            return await self._ops.release(unpack(ReleaseRequest, data))

    async def _status(self, data: bytes) -> StatusReply:
        return await self._ops.status(unpack(StatusRequest, data))

    async def _set_limit(self, data: bytes) -> AdminReply:
        request = unpack(SetLimitRequest, data)
        kind, _, name = request.scope.partition(":")
        if kind not in BUDGET_SCOPE_KINDS or not name:
            return AdminReply(ok=False, message=f"scope must be '<kind>:<name>' with kind one of "
                                                f"{'|'.join(BUDGET_SCOPE_KINDS)}, got {request.scope!r}")
        if any(not 0 < fraction <= 1 for fraction in request.alert_at):
            return AdminReply(ok=False, message="alert thresholds must be fractions in (0, 1]")
        assert self._kv is not None
        overrides = await store_override(self._kv, request)
        self._ops.books.limits = LimitBook(self._ops.books.config.budgets, overrides)
        await self._emit(EventKind.BUDGET_LIMIT_SET, detail={"scope": request.scope, "window": request.window,
                                                             "limit_micros": request.limit_micros})
        what = "removed" if request.limit_micros is None else f"set to {request.limit_micros} micro-USD"
        return AdminReply(ok=True, message=f"{request.window} limit of {request.scope} {what}")

    async def _rebuild(self, data: bytes) -> AdminReply:
        """Replace the counters in Redis by the ledger's, refusing reserves until done."""
        unpack(RebuildRequest, data)
        assert self._nc is not None and self._redis is not None
        books = self._ops.books
        async with self._rebuilding:
            books.counters_ok = False
            await self._redis.delete(self._ops.accountant.epoch_key)  # other replicas refuse too meanwhile
            folded = fold(await read_ledger(self._nc.jetstream(), self._subjects))
            await write_folded(self._ops.accountant, folded, books.limits)
            await self._ops.accountant.set_epoch(books.epoch)
            books.counters_ok = True
        counters = folded.counters().values()
        reply = AdminReply(ok=True, message=f"rebuilt the budget counters from {len(folded.calls)} calls in the ledger",
                           calls=len(folded.calls), held_micros=sum(c.get("held", 0) for c in counters),
                           spent_micros=sum(c.get("spent", 0) for c in counters))
        await self._emit(EventKind.BUDGET_REBUILT, cost_micros=reply.spent_micros, detail={"calls": reply.calls})
        log.info("budget.rebuilt", calls=reply.calls, spent_micros=reply.spent_micros, held_micros=reply.held_micros)
        return reply

    async def _emit(self, kind: EventKind, **fields: object) -> None:
        assert self._outcomes is not None
        await self._outcomes.emit(kind, **fields)

    # --- background work ---------------------------------------------------------------------

    async def _check_epoch(self) -> None:
        """Agree with Redis on the counters' epoch: adopt or create one, or refuse until rebuilt."""
        assert self._kv is not None
        books, accountant = self._ops.books, self._ops.accountant
        try:
            stored: str | None = (await self._kv.get(BUDGET_EPOCH_KEY)).value.decode()  # type: ignore[union-attr]
        except KeyNotFoundError:
            stored = None
        in_redis = await accountant.epoch()
        if stored is None:  # first start of this mesh: adopt Redis's epoch, or begin one
            stored = in_redis or new_epoch()
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self._kv.create(BUDGET_EPOCH_KEY, stored.encode())
            stored = (await self._kv.get(BUDGET_EPOCH_KEY)).value.decode()  # type: ignore[union-attr]
            if in_redis is None:
                await accountant.set_epoch(stored)
                in_redis = stored
        books.epoch = stored
        books.counters_ok = in_redis == stored
        if not books.counters_ok:
            log.error("budget.counters_lost", hint="run `toolbus budget rebuild`", redis_epoch=in_redis)

    async def _reap(self) -> None:
        if not self._rebuilding.locked():
            await self._ops.reap()

    async def _recheck_epoch(self) -> None:
        """Pick up a rebuild done by another replica."""
        books = self._ops.books
        if not books.counters_ok and not self._rebuilding.locked():
            books.counters_ok = await self._ops.accountant.epoch() == books.epoch

    def _on_config(self, config: Config) -> None:
        books = self._ops.books
        books.config = config
        books.limits = LimitBook(config.budgets, books.limits.overrides)

    def _on_budget_limits(self, overrides: list[SetLimitRequest]) -> None:
        """Runtime limits set through any replica (the registry watch the router uses too)."""
        books = self._ops.books
        books.limits = LimitBook(books.config.budgets, overrides)

    async def _every(self, seconds: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
            except Exception as error:  # noqa: BLE001  # Redis or NATS away for a moment: try again next round
                log.warning("budget.background_failed", work=work.__name__, error=repr(error))
            await asyncio.sleep(seconds)



def _outcome(reply: BaseModel) -> str:
    if isinstance(reply, ReserveReply):
        return reply.refusal.reason.value if reply.refusal else "held" if reply.hold else "free"
    if isinstance(reply, LedgerReply):
        return "changed" if reply.changed else "error" if reply.error else "unchanged"
    return "ok" if getattr(reply, "ok", True) else "error"

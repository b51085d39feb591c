"""Priority intake: a worker starts the highest-priority waiting call first, with a starvation share.

Each priority level 0..3 of a pool has its own durable pull consumer on WORK. The rule:

* A free slot is filled from the **highest-priority level with a call waiting** (0 before 1 ...).
* Except every `period`-th start (`period = ceil(1 / starvation_share)`, default 10), a
  *starvation turn*, which is filled from the **lowest-priority level with a call waiting**.

So under a sustained priority-0 flood, lower levels still get at least one start in `period`,
and when nothing lower waits, a starvation turn simply takes the highest level.

How messages are fetched: for a free slot the worker asks the levels in turn order with a
`no_wait` pull request (batch = free slots, answered at once) and takes from the first that has
messages. A level found empty gets a lingering `batch=1` request instead (expiring after
`idle_expires_s`), and is skipped while that request is open: a new call there is delivered
at once and starts at the next free slot, without the worker asking again. So under steady
load a refill costs one round trip, however many higher levels are empty, and at most one
request per level is open at a time: at most `concurrency + levels` messages are ever
delivered to a worker and not yet started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.bus import JS_API

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 2.0  # a no_wait request is answered at once; longer means the connection is down
BUSY_BACKOFF_S = 0.05  # pause when the server refuses pulls (409, e.g. max ack pending reached)
RECONNECT_CHECK_S = 1.0  # how often an idle worker looks for a reconnect that dropped its requests


@dataclass(frozen=True)
class IntakeSettings:
    """The consumers (index = priority) and how many calls a worker runs at once."""

    stream: str
    durables: tuple[str, ...]
    concurrency: int
    starvation_share: float = 0.1
    idle_expires_s: float = 5.0

    @property
    def starvation_period(self) -> int:
        """Every how many starts one is a starvation turn."""
        return max(2, math.ceil(1 / self.starvation_share))


class _Level:
    """One priority level: its consumer, its open pull request, messages delivered but not started."""

    def __init__(self, priority: int, durable: str, stream: str) -> None:
        self.priority = priority
        self.next_subject = f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.ready: deque[Msg] = deque()
        self.open_until = 0.0  # an open request may deliver until then
        self.left = 0  # messages the open request may still deliver
        self.refused = False  # the last request ended with a 409 (server-side limit)
        self.settled = asyncio.Event()
        self.sub: Subscription | None = None

    @property
    def is_open(self) -> bool:
        return self.left > 0 and time.monotonic() < self.open_until

    def opened(self, batch: int, lifetime_s: float) -> None:
        self.left, self.refused = batch, False
        self.open_until = time.monotonic() + lifetime_s
        self.settled.clear()

    def closed(self, *, refused: bool = False) -> None:
        self.left, self.refused = 0, refused
        self.settled.set()


MessageHandler = Callable[[Msg, int], Awaitable[None]]


class PriorityIntake:
    """Feeds a handler `(msg, priority)` with at most `concurrency` calls at once, by priority."""

    def __init__(self, nc: NatsClient, settings: IntakeSettings, handler: MessageHandler) -> None:
        self._nc = nc
        self._settings = settings
        self._handler = handler
        self._levels = [_Level(p, d, settings.stream) for p, d in enumerate(settings.durables)]
        self._running: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._starts = 0
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._reconnects = nc.stats["reconnects"]

    @property
    def in_flight(self) -> int:
        """Calls being handled right now."""
        return len(self._running)

    async def start(self) -> None:
        for level in self._levels:
            level.sub = await self._nc.subscribe(self._nc.new_inbox(), cb=self._receiver(level))
        self._loop_task = asyncio.create_task(self._run(), name="priority-intake")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking calls, NAK the ones delivered but not started, let running ones finish."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for level in self._levels:
            if level.sub is not None:
                with contextlib.suppress(Exception):
                    await level.sub.unsubscribe()
            await self._nak_ready(level)
        if self._running:
            await asyncio.wait(self._running, timeout=drain_timeout)

    async def _nak_ready(self, level: _Level) -> None:
        while level.ready:
            with contextlib.suppress(Exception):
                await level.ready.popleft().nak()

    def _receiver(self, level: _Level) -> Callable[[Msg], Awaitable[None]]:
        async def receive(msg: Msg) -> None:
            status = msg.headers.get("Status") if msg.headers and not msg.data else None
            if status == "100":
                return  # idle heartbeat
            if status is not None:
                level.closed(refused=status == "409")
            elif self._stopping:
                await msg.nak()  # arrived after stop: give it back at once
                return
            else:
                level.ready.append(msg)
                level.left -= 1
                if level.left <= 0:
                    level.closed()
            self._changed.set()

        return receive

    async def _run(self) -> None:
        while not self._stopping:
            self._forget_requests_after_reconnect()
            self._start_ready()
            free = self._settings.concurrency - len(self._running) - self._ready_count()
            if free > 0 and not await self._probe(free) and not self._ready_count():
                await self._park(refused=any(level.refused for level in self._levels))
            elif free <= 0:
                await self._wait_change()

    def _forget_requests_after_reconnect(self) -> None:
        """Pull requests do not survive a reconnect (a restarted server forgets them)."""
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            for level in self._levels:
                level.closed()

    def _start_ready(self) -> None:
        """Start handlers for delivered messages while slots are free, in turn order."""
        while len(self._running) < self._settings.concurrency:
            level = next((lv for lv in self._turn_order() if lv.ready), None)
            if level is None:
                return
            self._starts += 1
            task = asyncio.create_task(self._handle(level.ready.popleft(), level.priority))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _turn_order(self) -> list[_Level]:
        """Highest priority first, except on a starvation turn (every `period`-th start)."""
        return list(reversed(self._levels)) if self._starvation_turn_next() else self._levels

    async def _probe(self, wanted: int) -> bool:
        """Ask levels in turn order for up to `wanted` calls (no_wait); True once one delivered."""
        for level in self._turn_order():
            if level.is_open:
                continue  # a lingering request is open there: that level has nothing waiting
            batch = 1 if level is not self._levels[0] and self._starvation_turn_next() else wanted
            await self._request(level, {"batch": batch, "no_wait": True}, PROBE_TIMEOUT_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(level.settled.wait(), PROBE_TIMEOUT_S)
            if level.ready:
                return True
            if not level.refused:
                await self._linger(level)
        return False

    async def _linger(self, level: _Level) -> None:
        """Leave a `batch=1` request open on an empty level: its next call is delivered at once."""
        expires = self._settings.idle_expires_s
        await self._request(level, {"batch": 1, "expires": int(expires * 1e9)}, expires + 1)

    def _starvation_turn_next(self) -> bool:
        return (self._starts + 1) % self._settings.starvation_period == 0

    async def _park(self, *, refused: bool) -> None:
        """Nothing waits anywhere: leave one lingering request per level and sleep until something changes."""
        if refused:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), BUSY_BACKOFF_S)
            self._changed.clear()
            return
        for level in self._levels:
            if not level.is_open:
                await self._linger(level)
        await self._wait_change(timeout=min(self._settings.idle_expires_s, RECONNECT_CHECK_S))

    async def _request(self, level: _Level, body: dict[str, object], lifetime_s: float) -> None:
        assert level.sub is not None
        level.opened(int(str(body["batch"])), lifetime_s)
        await self._nc.publish(level.next_subject, json.dumps(body).encode(), reply=level.sub.subject)

    async def _wait_change(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    def _ready_count(self) -> int:
        return sum(len(level.ready) for level in self._levels)

    async def _handle(self, msg: Msg, priority: int) -> None:
        try:
            await self._handler(msg, priority)
        except Exception:
            log.exception("intake.handler_failed", priority=priority)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._changed.set()

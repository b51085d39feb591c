"""NATS wiring shared by every service: connection, stream provisioning, pipelined pulls.

Why a pull loop of our own: a loop of `fetch(batch=1)` pays one round trip per message and
FastStream 0.7's pull subscriber fetches a batch, handles all of it, then fetches again. Here,
as nats.go's `Consume()` does, up to `max_in_flight` messages are requested or being handled at
any time and the request is topped up once half of that budget is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from shared.subjects import Stream, Subjects

log = structlog.get_logger(__name__)

HOUR = 3600.0
DAY = 24 * HOUR
DEDUPE_WINDOW_S = 120.0
AUDIT_DEDUPE_WINDOW_S = 600.0
JS_API = "$JS.API"


def servers_of(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` → both: a URL may name every node of a cluster."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(url: str, name: str) -> NatsClient:
    """Connect with reconnects that never give up: a broker restart must not kill a service."""

    async def on_error(error: Exception) -> None:
        log.warning("nats.error", error=str(error))

    return await nats.connect(
        servers_of(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        error_cb=on_error,
    )


def stream_configs(subjects: Subjects, replicas: int = 1) -> list[StreamConfig]:
    """The streams of DESIGN.md §5 with their retention rules."""

    def make(stream: Stream, **options: object) -> StreamConfig:
        return StreamConfig(
            name=stream.value,
            subjects=subjects.stream_subjects(stream),
            storage=StorageType.FILE,
            num_replicas=replicas,
            **options,  # type: ignore[arg-type]  # StreamConfig's keyword types are per field
        )

    return [
        make(Stream.CALLS, max_age=DAY, duplicate_window=DEDUPE_WINDOW_S),
        make(Stream.WORK, retention=RetentionPolicy.WORK_QUEUE, duplicate_window=DEDUPE_WINDOW_S),
        make(
            Stream.RESULTS,
            max_age=HOUR,
            max_msgs_per_subject=1,
            duplicate_window=DEDUPE_WINDOW_S,
            allow_direct=True,
        ),
        make(Stream.EVENTS, max_age=7 * DAY),
        make(Stream.DLQ, max_age=30 * DAY),
        # A redelivered event must find its first record's Nats-Msg-Id still remembered, even
        # behind a backlog: the window is longer than the writers' AckWait by a wide margin.
        make(Stream.AUDIT, deny_delete=True, deny_purge=True, discard=DiscardPolicy.NEW,
             duplicate_window=AUDIT_DEDUPE_WINDOW_S),
        make(Stream.AUDIT_CP, deny_delete=True, deny_purge=True, discard=DiscardPolicy.NEW),
    ]


async def provision_streams(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> None:
    """Create every stream, or bring an existing one to the wanted config (safe to repeat)."""
    for config in stream_configs(subjects, replicas):
        try:
            await js.add_stream(config)
        except BadRequestError:
            # "stream name already in use with a different configuration": update in place.
            await js.update_stream(config)


async def ensure_consumer(js: JetStreamContext, stream: Stream, config: ConsumerConfig) -> None:
    """Create a durable consumer, or update it to `config` when it already exists."""
    config.ack_policy = AckPolicy.EXPLICIT
    try:
        await js.add_consumer(stream.value, config)
    except BadRequestError:
        await js.add_consumer(stream.value, config)  # the create API also updates in place


MessageHandler = Callable[[Msg], Awaitable[None]]


@dataclass(frozen=True)
class PullSettings:
    """How one pipelined pull consumer requests messages."""

    stream: Stream
    durable: str
    max_in_flight: int = 64  # requested + being handled, at most
    expires_s: float = 30.0  # lifetime of one pull request on the server
    heartbeat_s: float = 2.0  # idle heartbeat the server sends while a request waits


class PullConsumer:
    """Keeps a durable consumer's messages flowing to a handler with bounded concurrency.

    The handler owns ack/nak. A handler that raises has its message NAKed for redelivery.
    """

    def __init__(self, nc: NatsClient, settings: PullSettings, handler: MessageHandler) -> None:
        self._nc = nc
        self._settings = settings
        self._handler = handler
        self._requested = 0
        self._handling: set[asyncio.Task[None]] = set()
        self._last_seen = time.monotonic()
        self._stopping = False
        self._inbox = ""
        self._sub: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._reconnects = nc.stats["reconnects"]

    @property
    def in_flight(self) -> int:
        """Messages currently being handled."""
        return len(self._handling)

    async def start(self) -> None:
        """Subscribe the private inbox and start requesting messages."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._pump = asyncio.create_task(self._pump_requests(), name=f"pull:{self._settings.durable}")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop pulling, let in-flight handlers finish (bounded), NAK anything that arrives late."""
        self._stopping = True
        self._wakeup.set()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._handling:
            await asyncio.wait(self._handling, timeout=drain_timeout)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _pump_requests(self) -> None:
        """Top up the outstanding pull request whenever half the budget is free."""
        s = self._settings
        while not self._stopping:
            self._forget_lost_requests()
            free = s.max_in_flight - self._requested - len(self._handling)
            if free >= max(1, s.max_in_flight // 2) and self._nc.is_connected:
                await self._request(free)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=s.heartbeat_s)

    async def _request(self, batch: int) -> None:
        s = self._settings
        body = {
            "batch": batch,
            "expires": int(s.expires_s * 1e9),
            "idle_heartbeat": int(s.heartbeat_s * 1e9),
        }
        subject = f"{JS_API}.CONSUMER.MSG.NEXT.{s.stream.value}.{s.durable}"
        await self._nc.publish(subject, json.dumps(body).encode(), reply=self._inbox)
        self._requested += batch
        self._last_seen = time.monotonic()

    def _forget_lost_requests(self) -> None:
        """After a reconnect or two missed heartbeats (a restarted server) assume nothing is pending."""
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects, self._requested = reconnects, 0
        if self._requested and time.monotonic() - self._last_seen > 2 * self._settings.heartbeat_s:
            log.info("pull.requests_lost", durable=self._settings.durable, requested=self._requested)
            self._requested = 0

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            self._on_status(status, msg)
            return
        self._requested = max(0, self._requested - 1)
        if self._stopping:
            await msg.nak()
            return
        task = asyncio.create_task(self._handle(msg))
        self._handling.add(task)
        task.add_done_callback(self._handled)

    def _on_status(self, status: str, msg: Msg) -> None:
        """408/409 end a request: what it did not deliver is no longer outstanding."""
        if status == "100":
            return  # idle heartbeat
        headers = msg.headers or {}
        pending = headers.get("Nats-Pending-Messages")
        self._requested = max(0, self._requested - int(pending)) if pending else 0
        if status not in ("404", "408"):
            log.warning("pull.status", durable=self._settings.durable, status=status,
                        description=headers.get("Description"))
        self._wakeup.set()

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._handler(msg)
        except Exception:
            log.exception("pull.handler_failed", durable=self._settings.durable)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        self._wakeup.set()


def header(msg: Msg, name: str) -> str | None:
    """A header value of a message, or None."""
    return msg.headers.get(name) if msg.headers else None

"""Reading an audit log out of NATS: records and checkpoints in stream order, and stream policies.

An ordered consumer per read (ephemeral: nothing is left behind on the server).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from shared.audit.verifier import StoredMessage, StreamPolicy
from shared.subjects import Stream, Subjects, audit_durable

READ_TIMEOUT_S = 10.0  # between two messages of a log being read; a stall beyond it is an error


async def stream_messages(js: JetStreamContext, stream: Stream, subject: str,
                          start_seq: int = 1) -> AsyncIterator[StoredMessage]:
    """Every message of `stream` on `subject` (wildcards allowed) from `start_seq`, in order.

    An ordered push consumer (flow-controlled, recreated by nats-py on a gap), read until the
    server says nothing is pending: what is appended meanwhile is included up to that point.
    """
    info = await js.stream_info(stream.value, subjects_filter=subject)
    if not sum((info.state.subjects or {}).values()):
        return
    sub = await js.subscribe(subject, stream=stream.value, ordered_consumer=True, idle_heartbeat=1.0,
                             deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             config=ConsumerConfig(opt_start_seq=start_seq))
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            yield StoredMessage(msg.metadata.sequence.stream, msg.subject, msg.data)
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def read_all(js: JetStreamContext, stream: Stream, subject: str) -> list[StoredMessage]:
    """`stream_messages` as a list."""
    return [msg async for msg in stream_messages(js, stream, subject)]


async def stream_policy(js: JetStreamContext, stream: Stream) -> StreamPolicy:
    """What the verifier checks of one stream's config, and the sequences the server says were deleted."""
    info = await js.stream_info(stream.value)
    config: StreamConfig = info.config
    unlimited = all(not value or value < 0 for value in (config.max_age, config.max_msgs, config.max_bytes,
                                                          config.max_msgs_per_subject))
    return StreamPolicy(
        name=stream.value, deny_delete=bool(config.deny_delete), deny_purge=bool(config.deny_purge),
        allow_rollup=bool(config.allow_rollup_hdrs), file_storage=config.storage == StorageType.FILE,
        unlimited=unlimited, first_seq=info.state.first_seq if info.state.messages else 1,
        deleted=tuple(await deleted_sequences(js, stream)) if info.state.num_deleted else (),
    )


async def deleted_sequences(js: JetStreamContext, stream: Stream) -> list[int]:
    """Sequences inside the stream that were deleted (nats-py's stream_info cannot ask for them)."""
    # nats-py keeps its connection private and has no option for deleted_details: ask the JS API directly.
    reply = await js._nc.request(f"$JS.API.STREAM.INFO.{stream.value}",
                                 json.dumps({"deleted_details": True}).encode(), timeout=5)
    return sorted(int(seq) for seq in json.loads(reply.data).get("state", {}).get("deleted") or [])


async def unrecorded_events(js: JetStreamContext, log_id: str) -> int:
    """Events the log's audit writers have not yet recorded (pending or unacked on their consumer)."""
    info = await js.consumer_info(Stream.EVENTS.value, audit_durable(log_id))
    return int(info.num_pending + info.num_ack_pending)


def log_subject(subjects: Subjects, log_id: str) -> str:
    """Every chain of one log."""
    return subjects.audit(log_id, "*")


@dataclass(frozen=True)
class LogSnapshot:
    """Everything `verify_log` reads: the AUDIT messages, one log's checkpoints, both streams' policies."""

    records: list[StoredMessage]
    checkpoints: list[StoredMessage]
    policies: list[StreamPolicy]


async def read_log(js: JetStreamContext, subjects: Subjects, log_id: str) -> LogSnapshot:
    """Read one log for verification: every AUDIT message (so other logs' messages are seen, and
    skipped), the log's checkpoints, and the policies of AUDIT and AUDIT_CP."""
    records = await read_all(js, Stream.AUDIT, f"{subjects.prefix}.audit.>")
    checkpoints = await read_all(js, Stream.AUDIT_CP, subjects.audit_checkpoint(log_id))
    policies = [await stream_policy(js, Stream.AUDIT), await stream_policy(js, Stream.AUDIT_CP)]
    return LogSnapshot(records, checkpoints, policies)

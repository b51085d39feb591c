"""Every NATS subject, stream, bucket and header name toolbus uses, in one place.

No service writes a subject string inline: it asks a `Subjects` for it. The prefix is
configurable (`toolbus.yaml: prefix`) so two meshes can share one NATS account; stream and
bucket names are the design's fixed names (one mesh per JetStream domain/account).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DEFAULT_PREFIX = "toolbus"


class Stream(StrEnum):
    """JetStream streams of DESIGN.md §5."""

    CALLS = "CALLS"  # durable ingress of producers' calls
    WORK = "WORK"  # routed calls waiting for a worker (work-queue retention)
    RESULTS = "RESULTS"  # final results, one per call id
    EVENTS = "EVENTS"  # lifecycle events
    DLQ = "DLQ"  # dead-lettered calls with their failure history
    AUDIT = "AUDIT"  # hash-chained audit records
    AUDIT_CP = "AUDIT_CP"  # signed audit checkpoints


REGISTRY_BUCKET = "toolbus-registry"
WORKERS_BUCKET = "toolbus-workers"  # worker heartbeats; entries expire when a worker stops beating


class Header(StrEnum):
    """NATS header names of the wire contract."""

    MSG_ID = "Nats-Msg-Id"  # call id; JetStream's dedupe key and toolbus's idempotency key
    AUTHORIZATION = "Authorization"  # "Bearer <api key>"
    REPLY_TO = "Toolbus-Reply-To"  # extra subject the final result is sent to
    PRIORITY = "Toolbus-Priority"  # 0 critical .. 3 low
    DEADLINE = "Toolbus-Deadline"  # epoch milliseconds
    SESSION = "Toolbus-Session"  # context session id
    CALL_ID = "Toolbus-Call-Id"  # on results and work items
    REPLAY = "Toolbus-Replay"  # on a work item re-published from the DLQ: the replay's id
    STATUS = "Toolbus-Status"  # on results: ok|tool_error|rejected|failed|timeout
    CONTENT_TYPE = "Content-Type"  # application/json for MCP payloads, msgpack for internals
    TRACEPARENT = "traceparent"  # W3C trace context
    TRACESTATE = "tracestate"


CONTENT_JSON = "application/json"
CONTENT_MSGPACK = "application/msgpack"


def audit_durable(log_id: str) -> str:
    """The EVENTS consumer every audit writer of one log shares."""
    return f"audit-{log_id}"


CONTEXT_DURABLE = "context"  # the EVENTS consumer context replicas share (tool results into sessions)


def work_durable(pool: str, priority: int) -> str:
    """The durable WORK consumer one priority level of a pool uses, shared by all its workers."""
    return f"pool-{pool}-p{priority}"


@dataclass(frozen=True)
class Subjects:
    """Subject names under one prefix (`toolbus` unless configured otherwise)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def call(self) -> str:
        """Ingress subject producers publish `tools/call` requests to."""
        return f"{self.prefix}.call"

    def work(self, pool: str, priority: int) -> str:
        """Subject of routed calls for one pool at one priority."""
        return f"{self.prefix}.work.{pool}.{priority}"

    def work_pool(self, pool: str) -> str:
        """Wildcard over every priority of one pool's work subjects."""
        return f"{self.prefix}.work.{pool}.*"

    def result(self, call_id: str) -> str:
        """Subject holding the final result of one call."""
        return f"{self.prefix}.result.{call_id}"

    def event(self, kind: str) -> str:
        """Subject of one lifecycle event kind, e.g. `call.completed`."""
        return f"{self.prefix}.evt.{kind}"

    def dlq(self, pool: str) -> str:
        """Subject of one pool's dead letters."""
        return f"{self.prefix}.dlq.{pool}"

    def audit(self, log_id: str, chain_id: str) -> str:
        """Subject of one audit chain."""
        return f"{self.prefix}.audit.{log_id}.{chain_id}"

    def audit_checkpoint(self, log_id: str) -> str:
        """Subject of one audit log's checkpoints."""
        return f"{self.prefix}.auditcp.{log_id}"

    def cancel(self, call_id: str) -> str:
        """Core-NATS subject a cancellation of one call is published to."""
        return f"{self.prefix}.cancel.{call_id}"

    def progress(self, call_id: str) -> str:
        """Core-NATS subject progress notifications of one call are forwarded to."""
        return f"{self.prefix}.progress.{call_id}"

    def log(self, call_id: str) -> str:
        """Core-NATS subject a running call's log notifications (`notifications/message`) are forwarded to."""
        return f"{self.prefix}.log.{call_id}"

    def input(self, call_id: str) -> str:
        """Core-NATS request subject a backend's mid-call requests to the caller (sampling, elicitation)
        are relayed on; whoever waits on the call answers."""
        return f"{self.prefix}.input.{call_id}"

    @property
    def resource_updated(self) -> str:
        """Core-NATS subject backends' `notifications/resources/updated` are forwarded to."""
        return f"{self.prefix}.resource.updated"

    def budget(self, verb: str) -> str:
        """Core-NATS request subject of the budget accountant: reserve, settle, release, status, set, rebuild."""
        return f"{self.prefix}.budget.{verb}"

    def ctx(self, verb: str) -> str:
        """Core-NATS request subject of the context store, e.g. `append` (DESIGN.md §5 lists the verbs)."""
        return f"{self.prefix}.ctx.{verb}"

    def mesh(self, verb: str) -> str:
        """Core-NATS request subject a running `toolbus up` answers, e.g. `scale`."""
        return f"{self.prefix}.mesh.{verb}"

    def stream_subjects(self, stream: Stream) -> list[str]:
        """The subjects each stream captures."""
        p = self.prefix
        return {
            Stream.CALLS: [self.call],
            Stream.WORK: [f"{p}.work.>"],
            Stream.RESULTS: [f"{p}.result.*"],
            Stream.EVENTS: [f"{p}.evt.>"],
            Stream.DLQ: [f"{p}.dlq.*"],
            Stream.AUDIT: [f"{p}.audit.*.*"],
            Stream.AUDIT_CP: [f"{p}.auditcp.*"],
        }[stream]

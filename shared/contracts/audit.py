"""Audit records (stream AUDIT) and offline inclusion proofs: the shapes compliance reads.

A record on the wire is a JSON `AuditEnvelope`: the `body` (hashed and signed), its `hash`
(hex SHA-256(0x00 ‖ RFC 8785 JSON of the body): also its Merkle leaf) and the writer's `sig`.
The body follows OCSF API Activity (class 6003) where it fits; `kind` keeps toolbus's own name.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RECORD_VERSION = 1
OCSF_API_ACTIVITY = 6003  # OCSF class "API Activity" (category 6, Application Activity)
WRITER_STARTED = "audit.writer_started"  # the record kind that certifies a chain's writer key
HIGH_RISK = 50  # a call whose `risk` is at least this is listed by `toolbus audit report`


class Activity(IntEnum):
    """OCSF API Activity `activity_id`."""

    UNKNOWN = 0  # nothing better fits
    CREATE = 1  # something was created: a call accepted, a session imported
    READ = 2  # something was read out: a session exported
    UPDATE = 3  # state changed: budget counters, breakers, config
    DELETE = 4  # something was removed: a context session, a user's sessions
    OTHER = 99  # tool-call lifecycle steps that are none of the above


class Outcome(StrEnum):
    """OCSF `status` of the activity."""

    SUCCESS = "success"  # it happened as asked
    FAILURE = "failure"  # refused, failed, timed out or dead-lettered
    UNKNOWN = "unknown"  # not an outcome yet (e.g. dispatched)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditActor(_Strict):
    """Who acted: a principal (with its scope and key id, never the key) or a service instance."""

    type: str = Field(description="`principal` or `service`.")
    id: str
    org: str | None = None
    team: str | None = None
    project: str | None = None
    key_id: str | None = Field(default=None, description="`sha256:` + 12 hex of the key's hash; never the key.")


class AuditResource(_Strict):
    """What was acted on."""

    type: str = Field(description="`tool`, `budget`, `backend`, `session`, `config`, `writer_key`, ...")
    id: str | None = None


class ResultDigest(_Strict):
    """A tool result, as its size and digest only."""

    bytes: int
    sha256: str


class AuditEvent(_Strict):
    """The audited event, OCSF-shaped."""

    class_uid: int = OCSF_API_ACTIVITY
    activity_id: Activity
    type_uid: int = Field(description="class_uid * 100 + activity_id (OCSF).")
    kind: str = Field(description="toolbus event kind, e.g. `call.completed`.")
    action: str = Field(description="What was attempted, e.g. `tools/call`, `budget.settle`.")
    actor: AuditActor
    resource: AuditResource
    outcome: Outcome
    status: str | None = Field(default=None, description="toolbus call status, when the event has one.")
    reason: str | None = None
    call_id: str | None = None
    trace_id: str | None = None
    risk: int | None = Field(default=None, description="Injection risk score 0..100 the router gave the call.")
    cost_micros: int | None = None
    event_ts: int = Field(description="When the event happened (epoch ms), as its source stamped it.")
    source: str = Field(description="The service instance that emitted the event.")
    arguments: Any = Field(default=None, description="Tool arguments, secret-looking fields redacted.")
    arguments_sha256: str | None = None
    result: ResultDigest | None = None
    detail: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class AuditBody(_Strict):
    """The hashed and signed part of a record."""

    v: int = RECORD_VERSION
    log_id: str
    chain_id: str
    chain_seq: int = Field(ge=1, description="1 for a chain's first record, then +1 per record.")
    prev: str = Field(description="Hex hash of the previous record on this chain (64 zeros for the first).")
    ts: int = Field(description="When the writer appended it (epoch ms).")
    writer_id: str = Field(description="Writer key name; its key signs the record.")
    src_seq: int | None = Field(default=None, description="EVENTS stream sequence of the source event.")
    event: AuditEvent


class AuditEnvelope(_Strict):
    """One message of stream AUDIT."""

    body: AuditBody
    hash: str = Field(description="Hex SHA-256(0x00 ‖ RFC 8785 JSON of body); the Merkle leaf.")
    sig: str = Field(description="Base64 Ed25519 signature of the writer over the domain-separated hash.")


class InclusionBundle(_Strict):
    """Everything needed to check one record is in the log, offline: `toolbus audit verify-proof`."""

    v: int = RECORD_VERSION
    record: AuditEnvelope
    stream_seq: int = Field(description="The record's sequence in stream AUDIT.")
    index: int = Field(description="Leaf index of the record in the checkpoint's tree.")
    tree_size: int
    proof: list[str] = Field(description="Base64 RFC 9162 inclusion path, leaf to root.")
    checkpoint: str = Field(description="The signed checkpoint note the proof leads to.")
    writer_key: str = Field(description="The writer's verifier key (note `vkey` form), listed in the checkpoint.")

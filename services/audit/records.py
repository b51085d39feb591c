"""From a lifecycle event to the body of an audit record (OCSF API Activity where it fits).

Pure functions: the event and the config in, an `AuditEvent` out. The actor's org, team and
project and its key id come from the config's principal, never from the key itself; every value
passes through the secret redaction once more, in case a producer of events forgot it.
"""

from __future__ import annotations

import math
from typing import Any

from shared.audit.entries import RecordError, arguments_digest, canonical_json
from shared.config import Config
from shared.contracts import CallStatus, Event, EventKind
from shared.contracts.audit import Activity, AuditActor, AuditEvent, AuditResource, Outcome, ResultDigest
from shared.telemetry import redact

JCS_MAX_INT = 2**53 - 1  # RFC 8785 numbers are IEEE doubles
FAILURES = {EventKind.CALL_REJECTED, EventKind.CALL_FAILED, EventKind.CALL_DEAD_LETTERED,
            EventKind.CALL_RETRIED, EventKind.BUDGET_EXCEEDED}
PENDING = {EventKind.CALL_DISPATCHED, EventKind.CALL_STARTED}
ACTIVITIES = {
    EventKind.CALL_ACCEPTED: Activity.CREATE,
    EventKind.BUDGET_RESERVED: Activity.UPDATE, EventKind.BUDGET_SETTLED: Activity.UPDATE,
    EventKind.BUDGET_RELEASED: Activity.UPDATE, EventKind.BUDGET_LIMIT_SET: Activity.UPDATE,
    EventKind.BUDGET_REBUILT: Activity.UPDATE, EventKind.BREAKER_OPENED: Activity.UPDATE,
    EventKind.BREAKER_HALF_OPEN: Activity.UPDATE, EventKind.BREAKER_CLOSED: Activity.UPDATE,
    EventKind.CONFIG_RELOADED: Activity.UPDATE, EventKind.TOOLS_REGISTERED: Activity.CREATE,
    EventKind.CTX_BLOCK_ADDED: Activity.CREATE, EventKind.CTX_IMPORTED: Activity.CREATE,
    EventKind.CTX_EXPORTED: Activity.READ, EventKind.CTX_PRUNED: Activity.DELETE,
    EventKind.CTX_DELETED: Activity.DELETE,
}


def audit_event(event: Event, config: Config | None) -> AuditEvent:
    """The audit view of one event."""
    activity = ACTIVITIES.get(event.kind, Activity.OTHER)
    return AuditEvent(
        activity_id=activity, type_uid=6003 * 100 + activity, kind=event.kind.value,
        action=action_of(event.kind), actor=actor_of(event, config), resource=resource_of(event),
        outcome=outcome_of(event), status=event.status.value if event.status else None, reason=event.reason,
        call_id=event.call_id, trace_id=event.trace_id, risk=event.risk, cost_micros=event.cost_micros,
        event_ts=event.ts_ms, source=event.source, result=_result(event), detail=_detail(event),
        **_arguments(event),
    )


def _arguments(event: Event) -> dict[str, Any]:
    """Redacted arguments, or only their digest when RFC 8785 cannot represent them (NaN, ints past 2**53)."""
    arguments = redact(event.arguments)
    try:
        canonical_json(arguments)
    except RecordError:
        return {"arguments": None, "arguments_sha256": arguments_digest(arguments)}
    return {"arguments": arguments, "arguments_sha256": event.arguments_sha256}


def action_of(kind: EventKind) -> str:
    """`tools/call` for a call's lifecycle, else the event's family and verb (`budget.settled`)."""
    return "tools/call" if kind.value.startswith("call.") else kind.value


def actor_of(event: Event, config: Config | None) -> AuditActor:
    """The principal behind the event (with its scope and key id), or the emitting service."""
    if event.principal is None:
        return AuditActor(type="service", id=event.source)
    principal = next((p for p in (config.principals if config else []) if p.name == event.principal), None)
    if principal is None:
        return AuditActor(type="principal", id=event.principal)
    scope = principal.scope
    return AuditActor(type="principal", id=principal.name, org=scope.org, team=scope.team,
                      project=scope.project, key_id=f"sha256:{principal.key_sha256[:12]}")


def resource_of(event: Event) -> AuditResource:
    """What the event acted on."""
    family = event.kind.value.partition(".")[0]
    detail = event.detail
    if family == "breaker":
        return AuditResource(type="backend", id=_text(detail.get("backend")))
    if event.kind in (EventKind.BUDGET_LIMIT_SET, EventKind.BUDGET_REBUILT):
        return AuditResource(type="budget", id=_text(detail.get("scope")))
    if family == "ctx":
        return AuditResource(type="session", id=_text(detail.get("session_id") or detail.get("user")))
    if event.kind is EventKind.CONFIG_RELOADED:
        return AuditResource(type="config", id=_text(detail.get("revision")))
    if event.tool is not None:
        return AuditResource(type="tool", id=event.tool)
    return AuditResource(type=family, id=event.pool)


def outcome_of(event: Event) -> Outcome:
    """Failure for refusals, failed attempts and tool errors; unknown while a call is under way."""
    if event.kind in FAILURES or event.status in (CallStatus.TOOL_ERROR, CallStatus.FAILED, CallStatus.TIMEOUT,
                                                  CallStatus.REJECTED):
        return Outcome.FAILURE
    return Outcome.UNKNOWN if event.kind in PENDING else Outcome.SUCCESS


def _result(event: Event) -> ResultDigest | None:
    if event.result_bytes is None or event.result_sha256 is None:
        return None
    return ResultDigest(bytes=event.result_bytes, sha256=event.result_sha256)


def _detail(event: Event) -> dict[str, str | int | float | bool | None]:
    """The event's detail plus its pool, attempt, duration and budget buckets; finite numbers only."""
    extra: dict[str, Any] = {"pool": event.pool, "attempt": event.attempt, "duration_ms": event.duration_ms,
                             "buckets": ",".join(event.buckets) or None}
    merged = {**redact(dict(event.detail)), **{k: v for k, v in extra.items() if v is not None}}
    return {k: _jcs_scalar(v) for k, v in merged.items()}


def _jcs_scalar(value: Any) -> str | int | float | bool | None:
    """A value RFC 8785 can represent: non-finite floats become null, integers past 2**53 text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > JCS_MAX_INT:
        return str(value)
    return value  # type: ignore[no-any-return]


def _text(value: object) -> str | None:
    return None if value is None else str(value)

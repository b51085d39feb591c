"""Results of calls that carry `Toolbus-Session`, appended to that session as TOOL blocks.

The executor's final event names the session; the result itself is read from RESULTS by call id
(events never carry tool output). The block's id is derived from the call id, and a session never
appends an id twice, so a redelivered event, a second context replica or a replay adds nothing:
each call's result appears exactly once. A session deleted or expired meanwhile is skipped.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from services.context.sessions import ContextOperations, Origin
from shared.codec import unpack
from shared.contracts import CallStatus, Event, EventKind
from shared.contracts.context import AppendBlocks, BlockType, NewBlock
from shared.errors import ContextTooLarge, SessionNotFound
from shared.subjects import Stream, Subjects

log = structlog.get_logger(__name__)

FINAL_EVENTS = (EventKind.CALL_COMPLETED, EventKind.CALL_FAILED, EventKind.CALL_DEAD_LETTERED,
                EventKind.CALL_REJECTED)
TRUNCATED = "\n[truncated: {dropped} more bytes]"


def block_id(call_id: str) -> str:
    """The TOOL block id of a call's result (one per call, ever)."""
    return f"call:{call_id}"


class ToolResults:
    """Turns final call events into TOOL blocks."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, operations: ContextOperations) -> None:
        self._js = js
        self._subjects = subjects
        self._ops = operations

    def filter_subjects(self) -> list[str]:
        return [self._subjects.event(kind.value) for kind in FINAL_EVENTS]

    async def record(self, data: bytes) -> None:
        """Append the result of the event's call to its session, if it has one; idempotent."""
        event = unpack(Event, data)
        if not event.session or not event.call_id:
            return
        block = await self._block(event)
        if block is None:
            return
        try:
            request = AppendBlocks(session_id=event.session, blocks=[block])
        except ValidationError:  # the router refuses such ids; an event from elsewhere may still carry one
            log.warning("ctx.tool_result_dropped", call_id=event.call_id, reason="invalid_session_id")
            return
        try:
            await self._ops.append(request, Origin(call_id=event.call_id, tool=event.tool, principal=event.principal))
        except (SessionNotFound, ContextTooLarge) as refused:
            log.warning("ctx.tool_result_dropped", call_id=event.call_id, session=event.session,
                        reason=refused.reason.value, message=refused.message)

    async def _block(self, event: Event) -> NewBlock | None:
        assert event.call_id is not None
        try:
            subject = self._subjects.result(event.call_id)
            stored = await self._js.get_last_msg(Stream.RESULTS.value, subject, direct=True)
        except NotFoundError:
            log.warning("ctx.tool_result_missing", call_id=event.call_id, session=event.session)
            return None
        response = json.loads(stored.data or b"{}")
        content, is_error = describe_result(response)
        limit = self._ops.config.max_block_bytes
        return NewBlock(
            id=block_id(event.call_id), type=BlockType.TOOL, content=truncate(content, limit), timestamp_ms=event.ts_ms,
            metadata={"tool": event.tool or "", "call_id": event.call_id, "is_error": str(is_error).lower(),
                      "status": (event.status or CallStatus.FAILED).value},
        )


def describe_result(response: dict[str, Any]) -> tuple[str, bool]:
    """The text an agent reads for a result, and whether it is an error."""
    if "error" in response:
        error = response["error"]
        reason = (error.get("data") or {}).get("reason", "error")
        return f"error {error.get('code')} ({reason}): {error.get('message', '')}", True
    result = response.get("result") or {}
    parts = [_content_text(item) for item in result.get("content") or []]
    if not any(parts) and result.get("structuredContent") is not None:
        parts = [json.dumps(result["structuredContent"], ensure_ascii=False, sort_keys=True)]
    return "\n".join(part for part in parts if part), bool(result.get("isError"))


def _content_text(item: dict[str, Any]) -> str:
    kind = item.get("type")
    if kind == "text":
        return str(item.get("text", ""))
    if kind == "resource":
        resource = item.get("resource") or {}
        return str(resource.get("text") or f"[resource {resource.get('uri', '')}]")
    if kind == "resource_link":
        return f"[resource link {item.get('uri', '')}]"
    return f"[{kind} {item.get('mimeType', '')}, {len(str(item.get('data', '')))} base64 chars]"


def truncate(text: str, limit_bytes: int) -> str:
    """`text` cut to at most `limit_bytes` UTF-8 bytes, marked when cut."""
    raw = text.encode()
    if len(raw) <= limit_bytes:
        return text
    marker_room = len(TRUNCATED.format(dropped=len(raw)).encode())
    if marker_room > limit_bytes:  # no room to say it was cut: cut anyway, the limit wins
        return raw[:limit_bytes].decode(errors="ignore")
    kept = raw[: limit_bytes - marker_room].decode(errors="ignore")
    return kept + TRUNCATED.format(dropped=len(raw) - len(kept.encode()))

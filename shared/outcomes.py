"""Publishing what happened to a call: final results (exactly one per call) and events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import BadRequestError, NoStreamResponseError, ServiceUnavailableError

from shared.codec import dump_json, dump_model_json, pack
from shared.contracts import CallStatus, Event, EventKind, JsonRpcError, ToolCallResponse
from shared.contracts.jsonrpc import RequestId
from shared.errors import ToolbusError
from shared.subjects import CONTENT_JSON, CONTENT_MSGPACK, Header, Subjects
from shared.telemetry import current_trace_id, trace_headers

log = structlog.get_logger(__name__)

WRONG_LAST_SEQUENCE = 10071  # JetStream's "wrong last sequence" API error code
PUBLISH_RETRY_S = 20.0  # longer than a JetStream leader election, shorter than AckWait matters
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


def now_ms() -> int:
    """Wall-clock epoch milliseconds, the unit of every timestamp on the bus."""
    return time.time_ns() // 1_000_000


def error_response(request_id: RequestId | None, call_id: str, error: ToolbusError) -> ToolCallResponse:
    """The JSON-RPC error response a producer receives for `error`."""
    return ToolCallResponse(id=request_id, error=JsonRpcError.model_validate(error.to_jsonrpc(call_id)))


class Outcomes:
    """Publishes results and events for one service instance."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, subjects: Subjects, source: str) -> None:
        self._nc = nc
        self._js = js
        self._subjects = subjects
        self.source = source

    async def publish_result(
        self, call_id: str, response: ToolCallResponse, status: CallStatus, reply_to: str | None
    ) -> bytes:
        """Store the final result unless one exists, then send it to `reply_to`; the result's JSON.

        `Nats-Expected-Last-Subject-Sequence: 0` makes RESULTS refuse a second result for the
        same call whatever the timing, so a producer reading RESULTS sees exactly one. The JSON is
        returned so a caller can describe it (size, digest) without serializing it again.
        """
        payload = dump_model_json(response)
        headers = self._result_headers(call_id, status)
        try:
            await publish_retrying(self._js, self._subjects.result(call_id), payload,
                                   {**headers, EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except BadRequestError as error:
            if error.err_code != WRONG_LAST_SEQUENCE:
                raise
            log.info("result.already_stored")
            return payload
        if reply_to:
            await self._nc.publish(reply_to, payload, headers=headers)
        return payload

    def _result_headers(self, call_id: str, status: CallStatus) -> dict[str, str]:
        return {
            Header.CALL_ID: call_id,
            Header.STATUS: status.value,
            Header.CONTENT_TYPE: CONTENT_JSON,
            **trace_headers(),
        }

    async def publish_progress(self, call_id: str, params: dict[str, Any]) -> None:
        """Forward one MCP progress notification of a running call to `toolbus.progress.<call_id>`.

        Core NATS, fire and forget: nobody may be listening, and a lost notification costs a
        progress bar one update, never the call.
        """
        notification = {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}
        try:
            await self._nc.publish(self._subjects.progress(call_id), dump_json(notification))
        except Exception as error:  # noqa: BLE001  # best effort by design (see above)
            log.debug("progress.not_forwarded", error=repr(error))

    async def emit(self, *kinds: EventKind, **fields: Any) -> None:
        """Publish events durably (JetStream, acks awaited together), sharing the given fields.

        `dedupe` distinguishes several events of one kind about one call (e.g. the alerts one
        settlement fires); without it they would share a message id and EVENTS would keep one.
        """
        dedupe = str(fields.pop("dedupe", ""))
        fields.setdefault("trace_id", current_trace_id())
        stamp = now_ms()
        events = [Event(kind=kind, ts_ms=stamp, source=self.source, **fields) for kind in kinds]
        await asyncio.gather(*(self._publish_event(event, dedupe) for event in events))

    async def _publish_event(self, event: Event, dedupe: str) -> None:
        headers = {Header.CONTENT_TYPE: CONTENT_MSGPACK, **trace_headers()}
        if event.call_id:  # a publish retried after a lost PubAck is deduplicated by EVENTS
            msg_id = f"{event.kind.value}:{event.call_id}:{event.attempt or 0}:{self.source}"
            headers[Header.MSG_ID] = f"{msg_id}:{dedupe}" if dedupe else msg_id
        await publish_retrying(self._js, self._subjects.event(event.kind.value), pack(event), headers)


async def publish_retrying(js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
    """A JetStream publish that rides out a stream leader election or a reconnect.

    Retrying in place (bounded) means a finished tool call is not run again just because
    its result could not be stored for a moment; the headers (expected sequence, message
    id) make a retry of a publish that did land harmless.
    """
    delay = 0.05
    async with asyncio.timeout(PUBLISH_RETRY_S):
        while True:
            try:
                return await js.publish(subject, payload, headers=headers)
            except (NoStreamResponseError, NatsTimeoutError, ServiceUnavailableError) as error:
                log.warning("publish.retrying", subject=subject, error=type(error).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

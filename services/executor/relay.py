"""What a backend sends the caller of a running call, relayed over the bus to whoever waits on it.

While a tool runs, its server may log (`notifications/message`), ask the caller's LLM
(`sampling/createMessage`) or ask the caller's user (`elicitation/create`). The executor's
session to a backend is shared by every call it runs, so each of these must be pinned to the
right call, or one caller would see another's log lines or answer another's questions:

- **Requests** (sampling, elicitation) are answered inside the call's own task: on the
  2026-07-28 wire the backend returns an `InputRequiredResult` and the SDK client runs our
  callback while it drives the call, so the call id is a `ContextVar` set around the request.
  The question goes to `toolbus.input.<call_id>` as a NATS request; no responder means the
  caller cannot answer, and the backend gets an error saying so.
- **A log line** carries no request id. It belongs to the call whose task delivers it (an
  in-process backend logs inside the call), or else, on a 2026-07-28 session (where a server
  logs only for requests that opted in with `io.modelcontextprotocol/logLevel`), to the one
  call in flight that opted in. A line that fits neither is dropped, never guessed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import structlog
from mcp.client.context import ClientRequestContext
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    CreateMessageRequestParams,
    CreateMessageResult,
    CreateMessageResultWithTools,
    ElicitRequestParams,
    ElicitResult,
    ErrorData,
    LoggingMessageNotificationParams,
)
from mcp_types import LOG_LEVEL_META_KEY as LOG_LEVEL_META  # "io.modelcontextprotocol/logLevel", the 2026 opt-in
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from pydantic import BaseModel, ValidationError

from shared.codec import dump_json
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

INPUT_TIMEOUT_S = 3600.0  # a person may take a while to answer; the call's own deadline cancels sooner

SERVING: ContextVar[str | None] = ContextVar("toolbus_serving_call", default=None)
"""The call id the current task is running on a backend (None outside a call)."""


class CallerRelay:
    """One backend session's link to the callers of its calls."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self._logging: set[str] = set()  # calls in flight that asked for log lines

    @contextlib.contextmanager
    def serving(self, call_id: str, meta: Mapping[str, Any] | None) -> Iterator[None]:
        """Around one backend request: what the backend sends meanwhile belongs to `call_id`."""
        token = SERVING.set(call_id)
        wants_logs = bool(meta) and LOG_LEVEL_META in meta  # type: ignore[operator]
        if wants_logs:
            self._logging.add(call_id)
        try:
            yield
        finally:
            SERVING.reset(token)
            self._logging.discard(call_id)

    # --- log lines -----------------------------------------------------------------------------

    async def log(self, params: LoggingMessageNotificationParams, *, request_scoped: bool) -> None:
        """Forward one log line to its call's `toolbus.log.<call_id>`, if it is certain whose it is.

        `request_scoped`: the session speaks 2026-07-28, so the server logs only for opted-in requests.
        """
        call_id = self._owner(request_scoped)
        if call_id is None:
            log.debug("backend.log_unattributed", level=params.level, in_flight=len(self._logging))
            return
        notification = {"jsonrpc": "2.0", "method": "notifications/message",
                        "params": params.model_dump(mode="json", by_alias=True, exclude_none=True)}
        try:
            await self._nc.publish(self._subjects.log(call_id), dump_json(notification))
        except Exception as error:  # noqa: BLE001  # best effort, like progress: a lost line never fails a call
            log.debug("backend.log_not_forwarded", error=repr(error))

    def _owner(self, request_scoped: bool) -> str | None:
        serving = SERVING.get()
        if serving is not None:
            return serving if serving in self._logging else None
        if request_scoped and len(self._logging) == 1:
            return next(iter(self._logging))
        return None

    # --- requests to the caller ----------------------------------------------------------------

    async def sampling(
        self, context: ClientRequestContext, params: CreateMessageRequestParams
    ) -> CreateMessageResult | CreateMessageResultWithTools | ErrorData:
        shape = CreateMessageResultWithTools if params.tools else CreateMessageResult
        return await self._ask("sampling/createMessage", params, shape)  # type: ignore[return-value]

    async def elicitation(self, context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult | ErrorData:
        return await self._ask("elicitation/create", params, ElicitResult)  # type: ignore[return-value]

    async def _ask(self, method: str, params: BaseModel, shape: type[BaseModel]) -> BaseModel | ErrorData:
        """Relay one request to the caller of the current call and give the backend its answer."""
        call_id = SERVING.get()
        if call_id is None:  # a request outside any call's task (a 2025-wire backend): nobody to ask
            return ErrorData(code=INVALID_REQUEST, message=f"toolbus cannot tell which call's caller {method} is for")
        body = {"method": method, "params": params.model_dump(mode="json", by_alias=True, exclude_none=True)}
        try:
            reply = await self._nc.request(self._subjects.input(call_id), dump_json(body), timeout=INPUT_TIMEOUT_S)
        except NoRespondersError:
            return ErrorData(code=INVALID_REQUEST, message=f"the caller of this call cannot answer {method}")
        except TimeoutError:
            return ErrorData(code=INTERNAL_ERROR, message=f"the caller did not answer {method} in time")
        return _answer(reply.data, shape, method)


def _answer(data: bytes, shape: type[BaseModel], method: str) -> BaseModel | ErrorData:
    """The caller's reply, `{"result": …}` or `{"error": {"code", "message"}}`, as the SDK wants it."""
    try:
        reply = json.loads(data)
        if "error" in reply:
            return ErrorData.model_validate(reply["error"])
        return shape.model_validate(reply["result"])
    except (ValueError, KeyError, TypeError, ValidationError):
        log.warning("backend.bad_input_reply", method=method, size=len(data))
        return ErrorData(code=INTERNAL_ERROR, message=f"the caller's answer to {method} was malformed")

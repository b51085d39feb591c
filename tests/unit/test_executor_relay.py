"""Whose call a backend's log line or question belongs to (`services/executor/relay.py`).

One warm backend session serves many calls at once, so a line must reach the caller it belongs
to or nobody: these tests pin the attribution rules with a recording stand-in for the NATS
connection (the relay's only collaborator).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from typing import Any

import mcp_types as types
import pytest
from nats.errors import NoRespondersError

from services.executor.relay import CallerRelay
from shared.subjects import Subjects

pytestmark = pytest.mark.unit

OPTED_IN = {types.LOG_LEVEL_META_KEY: "debug"}
LINE = types.LoggingMessageNotificationParams(level="info", data="working", logger="tool")


class RecordingBus:
    """What the relay published, and a canned answer (or failure) for its requests."""

    def __init__(self, answer: bytes | Exception = b"") -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.requested: list[tuple[str, dict[str, Any]]] = []
        self._answer = answer

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, json.loads(data)))

    async def request(self, subject: str, data: bytes, timeout: float) -> Any:
        self.requested.append((subject, json.loads(data)))
        if isinstance(self._answer, Exception):
            raise self._answer
        return type("Reply", (), {"data": self._answer})()

    @property
    def subjects(self) -> list[str]:
        return [subject for subject, _ in self.published]


def relay_on(bus: RecordingBus) -> CallerRelay:
    return CallerRelay(bus, Subjects("tb"))  # type: ignore[arg-type]


async def from_the_read_loop(relay: CallerRelay, *, request_scoped: bool) -> None:
    """A log line delivered outside any call's task, as a stdio session's read loop delivers it."""
    await asyncio.create_task(relay.log(LINE, request_scoped=request_scoped), context=contextvars.Context())


async def test_a_line_logged_in_a_calls_own_task_goes_to_that_call() -> None:
    bus = RecordingBus()
    relay = relay_on(bus)
    with relay.serving("call-b", OPTED_IN), relay.serving("call-a", OPTED_IN):
        await relay.log(LINE, request_scoped=False)  # two opted in, but the task says whose line it is
    assert bus.subjects == ["tb.log.call-a"]
    notification = bus.published[0][1]
    assert notification["method"] == "notifications/message"
    assert notification["params"] == {"level": "info", "data": "working", "logger": "tool"}


async def test_a_call_that_did_not_opt_in_gets_no_lines_even_from_its_own_task() -> None:
    bus = RecordingBus()
    relay = relay_on(bus)
    with relay.serving("call-a", {"other": 1}):
        await relay.log(LINE, request_scoped=True)
    assert bus.published == []


async def test_a_line_from_the_read_loop_goes_to_the_only_opted_in_call_on_a_2026_session() -> None:
    bus = RecordingBus()
    relay = relay_on(bus)
    with relay.serving("call-a", OPTED_IN), relay.serving("call-b", None):
        await from_the_read_loop(relay, request_scoped=True)
    assert bus.subjects == ["tb.log.call-a"]


@pytest.mark.parametrize(("opted_in", "request_scoped"), [(2, True), (1, False), (0, True)],
                         ids=["two-candidates", "2025-session-logs-unasked", "nobody-asked"])
async def test_a_line_whose_call_is_uncertain_is_dropped(opted_in: int, request_scoped: bool) -> None:
    """Two opted-in calls in flight, or a 2025 session (which logs whether asked or not): no guess."""
    bus = RecordingBus()
    relay = relay_on(bus)
    calls = [relay.serving(f"call-{n}", OPTED_IN) for n in range(opted_in)]
    for call in calls:
        call.__enter__()
    await from_the_read_loop(relay, request_scoped=request_scoped)
    for call in reversed(calls):
        call.__exit__(None, None, None)
    assert bus.published == []


async def test_lines_after_the_call_ended_are_dropped() -> None:
    bus = RecordingBus()
    relay = relay_on(bus)
    with relay.serving("call-a", OPTED_IN):
        pass
    await from_the_read_loop(relay, request_scoped=True)
    assert bus.published == []


SAMPLING = types.CreateMessageRequestParams(
    messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))], max_tokens=10)


async def test_a_question_goes_to_the_calls_input_subject_and_its_answer_back() -> None:
    answer = {"result": {"role": "assistant", "content": {"type": "text", "text": "hello"}, "model": "m"}}
    bus = RecordingBus(json.dumps(answer).encode())
    relay = relay_on(bus)
    with relay.serving("call-a", None):
        result = await relay.sampling(None, SAMPLING)  # type: ignore[arg-type]
    assert isinstance(result, types.CreateMessageResult)
    assert result.content.text == "hello"  # type: ignore[union-attr]
    subject, body = bus.requested[0]
    assert subject == "tb.input.call-a"
    assert body["method"] == "sampling/createMessage"
    assert body["params"]["messages"][0]["content"]["text"] == "hi"


@pytest.mark.parametrize(("answer", "code", "words"), [
    (NoRespondersError(), types.INVALID_REQUEST, "cannot answer sampling/createMessage"),
    (TimeoutError(), types.INTERNAL_ERROR, "did not answer"),
    (b'{"error": {"code": -1, "message": "user declined"}}', -1, "user declined"),
    (b"not json", types.INTERNAL_ERROR, "malformed"),
    (b'{"result": {"role": "robot"}}', types.INTERNAL_ERROR, "malformed"),
], ids=["no-responder", "timeout", "refused", "not-json", "wrong-shape"])
async def test_a_question_nobody_answers_well_gives_the_backend_an_error(
        answer: bytes | Exception, code: int, words: str) -> None:
    relay = relay_on(RecordingBus(answer))
    with relay.serving("call-a", None):
        result = await relay.sampling(None, SAMPLING)  # type: ignore[arg-type]
    assert isinstance(result, types.ErrorData)
    assert result.code == code
    assert words in result.message


async def test_a_question_outside_any_call_is_refused_without_asking_anyone() -> None:
    bus = RecordingBus()
    result = await relay_on(bus).sampling(None, SAMPLING)  # type: ignore[arg-type]
    assert isinstance(result, types.ErrorData)
    assert bus.requested == []

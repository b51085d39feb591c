"""Unit tests for shared.telemetry (secret redaction, trace ids, logging setup), shared.errors and shared.ids."""

from __future__ import annotations

import inspect
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from structlog.testing import capture_logs

from shared import errors
from shared.errors import (
    ERRORS_BY_CODE,
    BackendError,
    CallFailed,
    CallRefused,
    InternalError,
    InvalidArguments,
    Reason,
    ToolbusError,
    Unauthenticated,
)
from shared.ids import new_call_id
from shared.telemetry import REDACTED, add_trace_id, configure_logging, redact_secrets

pytestmark = pytest.mark.unit

SECRET = "sk-live-0123456789"


# --------------------------------------------------------------------------- redact_secrets


def test_redact_secrets_replaces_secret_fields() -> None:
    """Fields named api_key, token, password and Authorization come out as "[redacted]"."""
    event = redact_secrets(None, "info", {
        "event": "call.received", "api_key": SECRET, "token": SECRET, "password": SECRET, "Authorization": SECRET,
    })
    assert event == {
        "event": "call.received", "api_key": REDACTED, "token": REDACTED, "password": REDACTED,
        "Authorization": REDACTED,
    }
    assert REDACTED == "[redacted]"


@pytest.mark.parametrize(
    "name", ["key", "API_KEY", "apiKey", "access_token", "client_secret", "db_password", "authorization", "Secret"]
)
def test_redaction_matches_names_containing_secret_words(name: str) -> None:
    """Any field whose name contains key, token, secret, password or authorization, in any case, is redacted."""
    assert redact_secrets(None, "info", {name: SECRET})[name] == REDACTED


def test_redaction_leaves_other_fields_alone() -> None:
    """Fields not named like secrets, and the event message itself, are left unchanged."""
    event = {"event": "token refresh for key rotation", "call_id": "c-1", "tool": "demo__echo", "principal": "alice"}
    assert redact_secrets(None, "info", dict(event)) == event


def test_redaction_applies_to_non_string_values() -> None:
    """A secret-named field is redacted whatever its value's type."""
    event = redact_secrets(None, "info", {"token": 12345, "api_key": None, "password": ["a", "b"]})
    assert set(event.values()) == {REDACTED}


def test_redaction_mutates_and_returns_the_event() -> None:
    """The processor returns the very event dict it was given, so the chain continues with it."""
    event: dict[str, Any] = {"api_key": SECRET}
    assert redact_secrets(None, "info", event) is event


def test_capture_logs_with_the_redaction_processor() -> None:
    """A logger whose chain includes redact_secrets emits secret fields as "[redacted]"."""
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger("test").info("call.received", api_key=SECRET, token=SECRET, password=SECRET,
                                          Authorization=f"Bearer {SECRET}", tool="demo__echo")
    assert len(logs) == 1
    line = logs[0]
    assert line["api_key"] == line["token"] == line["password"] == line["Authorization"] == REDACTED
    assert line["tool"] == "demo__echo"
    assert SECRET not in repr(logs)


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Put structlog's global configuration and context back after a test that configures it."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.mark.usefixtures("restore_structlog")
def test_configured_logger_redacts_api_key_in_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    """A logger set up by configure_logging writes JSON lines to stderr with the api_key redacted."""
    configure_logging("router", json_lines=True)
    structlog.get_logger("toolbus.test").info("call.received", api_key=SECRET, tool="demo__echo")
    captured = capsys.readouterr()
    assert SECRET not in captured.err
    assert captured.out == ""
    lines = [json.loads(line) for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1
    line = lines[0]
    assert line["api_key"] == REDACTED
    assert line["event"] == "call.received"
    assert line["tool"] == "demo__echo"
    assert line["service"] == "router"
    assert line["level"] == "info"
    assert "timestamp" in line


@pytest.mark.usefixtures("restore_structlog")
def test_configured_logger_filters_below_its_level(capsys: pytest.CaptureFixture[str]) -> None:
    """Lines below the configured level are not written."""
    configure_logging("executor", json_lines=True, level="warning")
    log = structlog.get_logger("toolbus.test")
    log.info("quiet")
    log.warning("loud", password=SECRET)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["loud"]
    assert lines[0]["password"] == REDACTED


# --------------------------------------------------------------------------- add_trace_id


def test_add_trace_id_outside_a_span_adds_nothing() -> None:
    """Without a current span no trace_id is added."""
    assert add_trace_id(None, "info", {"event": "x"}) == {"event": "x"}


def test_add_trace_id_inside_a_span_adds_its_hex_id() -> None:
    """Inside a recording span the line gets the span's 32-hex-digit trace id."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("s") as span:
        event = add_trace_id(None, "info", {"event": "x"})
    assert event["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert len(event["trace_id"]) == 32


def test_add_trace_id_keeps_a_bound_trace_id() -> None:
    """A trace_id already on the line is not overwritten by the current span's."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("s"):
        assert add_trace_id(None, "info", {"trace_id": "bound"})["trace_id"] == "bound"


# --------------------------------------------------------------------------- errors


def test_to_jsonrpc_carries_code_message_reason_call_id_and_data() -> None:
    """A toolbus error becomes a JSON-RPC error object with reason, call id and the extra data."""
    error = InvalidArguments("request body is 9 bytes, the limit is 5", limit_bytes=5)
    assert error.to_jsonrpc("call-1") == {
        "code": -32602,
        "message": "request body is 9 bytes, the limit is 5",
        "data": {"reason": "invalid_arguments", "call_id": "call-1", "limit_bytes": 5},
    }
    assert str(error) == error.message


def test_to_jsonrpc_without_extra_data() -> None:
    """Without extra data, `data` holds just the reason and the call id."""
    assert Unauthenticated("unknown API key").to_jsonrpc("c")["data"] == {"reason": "unauthenticated", "call_id": "c"}


def test_internal_error_carries_only_a_correlation_id() -> None:
    """An internal error says only "internal error" and a correlation id, never the exception text."""
    try:
        raise RuntimeError("database password is hunter2")
    except RuntimeError:
        error = InternalError("corr-123")
    wire = error.to_jsonrpc("call-9")
    assert wire == {
        "code": -32603,
        "message": "internal error",
        "data": {"reason": "internal_error", "call_id": "call-9", "correlation_id": "corr-123"},
    }
    assert "hunter2" not in json.dumps(wire)


def test_internal_error_accepts_no_message() -> None:
    """InternalError's only parameter is the correlation id, so a message cannot be smuggled in."""
    assert list(inspect.signature(InternalError).parameters) == ["correlation_id"]


def test_backend_error_keeps_the_backend_code() -> None:
    """A backend's JSON-RPC error is reported as backend_error with its own code in data."""
    wire = BackendError("backend error: boom", backend_code=-32000).to_jsonrpc("c")
    assert wire["code"] == -32603
    assert wire["data"] == {"reason": "backend_error", "call_id": "c", "backend_code": -32000}


def concrete_errors() -> list[type[ToolbusError]]:
    """Every error class defined in shared.errors that a call or a context request can end with (bases excluded)."""
    bases = (ToolbusError, CallRefused, errors.ContextError)
    return [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, ToolbusError)
            and cls not in bases]


def test_errors_by_code_codes_are_unique() -> None:
    """Every class in ERRORS_BY_CODE has its own code, so none was silently overwritten."""
    classes = list(ERRORS_BY_CODE.values())
    assert len({cls.code for cls in classes}) == len(classes)
    assert all(ERRORS_BY_CODE[cls.code] is cls for cls in classes)
    assert len(set(classes)) == len(classes)


def test_errors_by_code_lists_every_error_but_backend_error() -> None:
    """ERRORS_BY_CODE maps every concrete error; only BackendError shares -32603 with InternalError."""
    assert set(ERRORS_BY_CODE.values()) == set(concrete_errors()) - {BackendError}
    assert BackendError.code == InternalError.code == -32603


def test_every_error_has_its_own_reason() -> None:
    """Each concrete error class has a distinct machine-readable reason."""
    reasons = [cls.reason for cls in concrete_errors()]
    assert len(set(reasons)) == len(reasons)
    assert set(reasons) == set(Reason)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(-32700, "parse_error"), (-32600, "invalid_request"), (-32601, "unknown_tool"), (-32602, "invalid_arguments"),
     (-32001, "unauthenticated"), (-32003, "forbidden"), (-32010, "budget_exceeded"), (-32029, "rate_limited"),
     (-32008, "deadline_exceeded"), (-32050, "circuit_open"), (-32053, "overloaded"), (-32060, "dead_lettered"),
     (-32800, "cancelled"), (-32603, "internal_error")],
)
def test_codes_match_the_design_table(code: int, reason: str) -> None:
    """Each JSON-RPC code maps to the error class with the documented reason."""
    assert ERRORS_BY_CODE[code].reason.value == reason


def test_call_failed_exposes_code_message_and_reason() -> None:
    """The client's CallFailed keeps the code, message and data.reason of the error it received."""
    failed = CallFailed(-32003, "may not call", {"reason": "forbidden", "call_id": "c"})
    assert (failed.code, failed.message, failed.reason) == (-32003, "may not call", "forbidden")
    assert "-32003" in str(failed)
    assert CallFailed(-32603, "x").reason == ""


# --------------------------------------------------------------------------- ids


def embedded_ms(call_id: str) -> int:
    """The Unix milliseconds in a UUIDv7's top 48 bits."""
    return uuid.UUID(call_id).int >> 80


def next_millisecond_after(ms: int) -> None:
    """Poll the clock until it has moved past `ms`, giving up after two seconds."""
    give_up = time.monotonic() + 2
    while time.time_ns() // 1_000_000 <= ms:
        assert time.monotonic() < give_up, "the wall clock did not advance"


def test_new_call_id_is_a_uuid_v7() -> None:
    """A call id is a canonical lowercase UUID of version 7 and the RFC 4122 variant."""
    call_id = new_call_id()
    parsed = uuid.UUID(call_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == call_id


def test_new_call_id_embeds_the_current_millisecond() -> None:
    """The top 48 bits of a call id are the wall-clock milliseconds at creation."""
    before = time.time_ns() // 1_000_000
    call_id = new_call_id()
    after = time.time_ns() // 1_000_000
    assert before <= embedded_ms(call_id) <= after


def test_thousand_call_ids_are_unique() -> None:
    """1000 call ids generated back to back are all different and all version 7."""
    ids = [new_call_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert {uuid.UUID(i).version for i in ids} == {7}
    assert {uuid.UUID(i).variant for i in ids} == {uuid.RFC_4122}


def test_call_ids_from_different_milliseconds_sort_by_creation() -> None:
    """Ids generated in successive milliseconds sort, as strings, in the order they were made."""
    ids = [new_call_id()]
    for _ in range(5):
        next_millisecond_after(embedded_ms(ids[-1]))
        ids.append(new_call_id())
    assert sorted(ids) == ids
    assert len({embedded_ms(i) for i in ids}) == len(ids)

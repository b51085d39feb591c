"""Logs and traces: structlog JSON lines carrying call_id and trace_id, W3C trace context.

Every line about a call carries `call_id` and `trace_id` (bound with `call_context`). The
trace context rides in the `traceparent`/`tracestate` headers of every hop, so one trace spans
producer → router → executor → result. Spans are exported over OTLP only when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set and the exporter package is installed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

# Whole name parts only: `api_key`, `token`, `Authorization` are secrets; `input_tokens`, `monkey` are not.
SECRET_KEY = re.compile(r"(^|[_-])(api_?key|key|token|secret|password|passwd|authorization|cookie)$", re.IGNORECASE)
# Values that are credentials whatever their field is called: bearer tokens and well-known key shapes.
SECRET_VALUE = re.compile(
    r"^(bearer\s+\S+|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----.*)$",
    re.IGNORECASE | re.DOTALL,
)
REDACTED = "[redacted]"


def redact_secrets(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any field named like a secret (api_key, token, password, ...)."""
    for name, value in list(event.items()):
        if name != "event":
            event[name] = _redacted(name, value)
    return event


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-named fields and credential-shaped strings redacted."""
    return _redacted("", value)


def _redacted(name: str, value: Any) -> Any:
    """The value, or REDACTED if its name or shape is secret-like; containers are redacted item by item."""
    if SECRET_KEY.search(name) or (isinstance(value, str) and SECRET_VALUE.match(value.strip())):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redacted(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted("", item) for item in value]
    return value


def add_trace_id(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the current span's trace id when the line has none bound."""
    if "trace_id" not in event:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            event["trace_id"] = format(span_context.trace_id, "032x")
    return event


def configure_logging(service: str, *, json_lines: bool | None = None, level: str = "info") -> None:
    """Configure structlog for a process: JSON when not on a terminal, key-value on one."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_id,
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def configure_tracing(service: str) -> None:
    """Install an SDK tracer provider so spans get real ids; export over OTLP when configured."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"toolbus-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        _add_otlp_exporter(provider)
    trace.set_tracer_provider(provider)


def _add_otlp_exporter(provider: TracerProvider) -> None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]  # noqa: PLC0415  # optional extra
            OTLPSpanExporter,
        )
    except ImportError:
        structlog.get_logger(__name__).warning("otlp.exporter_missing", hint="pip install toolbus[otlp]")
        return
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))


tracer = trace.get_tracer("toolbus")


def trace_headers() -> dict[str, str]:
    """`traceparent`/`tracestate` of the current span, to put on an outgoing message."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The remote trace context carried by an incoming message's headers."""
    return extract(dict(headers or {}))


def current_trace_id() -> str | None:
    """Hex trace id of the current span, if there is one."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


@contextmanager
def call_span(name: str, headers: Mapping[str, str] | None, call_id: str) -> Iterator[str | None]:
    """A span continuing the message's trace, with call_id and trace_id bound into every log line."""
    with tracer.start_as_current_span(name, context=context_from_headers(headers)) as span:
        span.set_attribute("toolbus.call_id", call_id)
        trace_id = current_trace_id()
        with structlog.contextvars.bound_contextvars(call_id=call_id, trace_id=trace_id):
            yield trace_id

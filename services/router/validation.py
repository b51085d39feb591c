"""Is this a well-formed call? Headers, body, size and depth limits, arguments vs inputSchema."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from pydantic import ValidationError

from shared.config import LimitsConfig
from shared.contracts import (
    BUS_METHODS,
    PromptGetRequest,
    ResourceReadRequest,
    ToolCallRequest,
    ToolSpec,
)
from shared.contracts.context import SESSION_ID_PATTERN
from shared.errors import InvalidArguments, InvalidRequest, ParseError, first_problem
from shared.subjects import Header

# Patterns are used with fullmatch: `$` would also accept a trailing newline.
ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}", re.IGNORECASE)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
SUBJECT = re.compile(r"[^\s*>]+")
SESSION_ID = re.compile(SESSION_ID_PATTERN.removeprefix("^").removesuffix("$"))
EPOCH_MS = re.compile(r"[0-9]{1,16}")  # ASCII only: str.isdigit() accepts superscripts and other scripts' digits
DEFAULT_PRIORITY = 2
_REQUEST_MODELS: dict[str, type[ToolCallRequest | ResourceReadRequest | PromptGetRequest]] = {
    "tools/call": ToolCallRequest, "resources/read": ResourceReadRequest, "prompts/get": PromptGetRequest}

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class IngressHeaders:
    """The bus metadata of a producer's call, validated."""

    call_id: str
    authorization: str | None
    priority: int
    deadline_ms: int | None
    reply_to: str | None
    session: str | None


def is_call_id(value: str) -> bool:
    """Call ids are ULIDs or UUIDs (v7 recommended): safe as a subject token, unique, sortable."""
    return bool(ULID.fullmatch(value) or UUID.fullmatch(value))


def parse_headers(headers: Mapping[str, str], call_id: str) -> IngressHeaders:
    """Validate the wire-contract headers; anything malformed is an `invalid_request`."""
    if not is_call_id(call_id):
        raise InvalidRequest(f"{Header.MSG_ID} must be a ULID or UUID, got {call_id!r}")
    return IngressHeaders(
        call_id=call_id,
        authorization=headers.get(Header.AUTHORIZATION),
        priority=_priority(headers.get(Header.PRIORITY)),
        deadline_ms=_deadline(headers.get(Header.DEADLINE)),
        reply_to=_reply_to(headers.get(Header.REPLY_TO)),
        session=_session(headers.get(Header.SESSION)),
    )


def _session(raw: str | None) -> str | None:
    """A context session id the context store accepts (checked at ingress, so no call carries one it refuses)."""
    if raw and not SESSION_ID.fullmatch(raw):
        raise InvalidRequest(f"{Header.SESSION} must be a session id ({SESSION_ID.pattern}), got {raw[:80]!r}")
    return raw or None


def _priority(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_PRIORITY
    if raw not in ("0", "1", "2", "3"):
        raise InvalidRequest(f"{Header.PRIORITY} must be 0, 1, 2 or 3, got {raw!r}")
    return int(raw)


def _deadline(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not EPOCH_MS.fullmatch(raw):
        raise InvalidRequest(f"{Header.DEADLINE} must be epoch milliseconds, got {raw!r}")
    return int(raw)


def _reply_to(raw: str | None) -> str | None:
    if raw and not SUBJECT.fullmatch(raw):
        raise InvalidRequest(f"{Header.REPLY_TO} is not a publishable subject: {raw!r}")
    return raw or None


def usable_reply_to(raw: str | None) -> str | None:
    """The reply subject if it is publishable, else None (used to answer malformed calls)."""
    return raw if raw and SUBJECT.fullmatch(raw) else None


def parse_body(body: bytes, limits: LimitsConfig) -> ToolCallRequest | ResourceReadRequest | PromptGetRequest:
    """Decode a `tools/call`, `resources/read` or `prompts/get` request within the size and nesting limits."""
    if len(body) > limits.max_body_bytes:
        raise InvalidArguments(
            f"request body is {len(body)} bytes, the limit is {limits.max_body_bytes}",
            limit_bytes=limits.max_body_bytes,
        )
    decoded = _decode_json(body, limits)
    if json_depth(decoded) > limits.max_depth:
        raise InvalidArguments(f"request nests deeper than {limits.max_depth} levels", max_depth=limits.max_depth)
    method = decoded.get("method") if isinstance(decoded, dict) else None
    if method not in BUS_METHODS:
        raise InvalidRequest(f"method must be one of {', '.join(BUS_METHODS)}, not {str(method)[:40]!r}")
    try:
        return _REQUEST_MODELS[method].model_validate(decoded)
    except ValidationError as error:
        raise InvalidRequest(f"not a valid MCP {method} request: {first_problem(error, 'body')}") from None


def _decode_json(body: bytes, limits: LimitsConfig) -> Any:
    """Strict UTF-8 JSON (json.loads on bytes would also guess UTF-16/32), no lone surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParseError(f"body is not valid UTF-8: {error}") from None
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ParseError(f"body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidArguments(f"request nests deeper than {limits.max_depth} levels",
                               max_depth=limits.max_depth) from None
    if "\\u" in text and _has_lone_surrogate(decoded):
        raise ParseError("body contains a \\u escape of a lone UTF-16 surrogate, which is not valid Unicode")
    return decoded


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if any(0xD800 <= ord(ch) <= 0xDFFF for ch in node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def request_id_of(body: bytes) -> Any:
    """Best-effort JSON-RPC id of a body that failed validation (null when unreadable)."""
    try:
        decoded = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    request_id = decoded.get("id") if isinstance(decoded, dict) else None
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion (a hostile body can't blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


class ArgumentValidators:
    """JSON Schema validators of every tool's inputSchema, each compiled once per registration."""

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, int], Validator] = {}

    def validate(self, spec: ToolSpec, arguments: dict[str, Any]) -> None:
        """Refuse arguments that fail the tool's inputSchema, naming the first failing path.

        A schema the validator cannot evaluate (unknown type, bad regex) is the backend's bug:
        the call goes through and the backend's own validation decides.
        """
        try:
            error = next(iter(self._validator(spec).iter_errors(arguments)), None)
        except Exception:  # noqa: BLE001  # jsonschema raises UnknownType, re.error, ... on broken schemas
            log.warning("router.schema_unusable", tool=spec.public_name)
            return
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidArguments(
                f"arguments do not match {spec.public_name}'s inputSchema at {where}: {error.message}"
            )

    def _validator(self, spec: ToolSpec) -> Validator:
        key = (spec.public_name, spec.registered_at_ms)
        if key not in self._compiled:
            self._compiled = {k: v for k, v in self._compiled.items() if k[0] != spec.public_name}
            self._compiled[key] = compile_schema(spec.input_schema)
        return self._compiled[key]


def compile_schema(schema: dict[str, Any]) -> Validator:
    """A validator for the schema's declared draft (2020-12 when it declares none)."""
    try:
        cls = validators.validator_for(schema, default=Draft202012Validator)
        cls.check_schema(schema)
    except (SchemaError, TypeError, KeyError):
        cls = Draft202012Validator  # a sloppy backend schema: validate what can be validated
    return cls(schema)

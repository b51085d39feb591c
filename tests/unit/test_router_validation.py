"""Unit tests for services.router.validation: headers, body limits, depth and argument schemas."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema.protocols import Validator

from services.router import validation
from services.router.validation import (
    DEFAULT_PRIORITY,
    ArgumentValidators,
    IngressHeaders,
    compile_schema,
    is_call_id,
    json_depth,
    parse_body,
    parse_headers,
    request_id_of,
    usable_reply_to,
)
from shared.config import LimitsConfig
from shared.contracts import PromptGetRequest, ResourceReadRequest, ToolCallRequest, ToolSpec
from shared.errors import InvalidArguments, InvalidRequest, ParseError
from shared.ids import new_call_id
from shared.subjects import Header

pytestmark = pytest.mark.unit

ULID_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
UUID7_ID = "0190b8a4-3c1e-7d2a-9f00-1234567890ab"
LIMITS = LimitsConfig(max_body_bytes=1024, max_depth=8)


def request(**overrides: Any) -> dict[str, Any]:
    """A valid tools/call request as a decoded JSON object, with top-level members replaced."""
    body: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "demo__echo", "arguments": {"text": "hi"}},
    }
    body.update(overrides)
    return body


def encode(value: Any) -> bytes:
    """The compact UTF-8 JSON encoding of `value`."""
    return json.dumps(value, separators=(",", ":")).encode()


def spec(schema: dict[str, Any], *, name: str = "demo__echo", registered_at_ms: int = 1) -> ToolSpec:
    """A registered tool with the given inputSchema."""
    return ToolSpec(
        public_name=name, server="demo", pool="default", tool=name.removeprefix("demo__"),
        input_schema=schema, registered_at_ms=registered_at_ms,
    )


ECHO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "times": {"type": "integer", "minimum": 1}},
    "required": ["text"],
}


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("call_id", [ULID_ID, ULID_ID.lower(), UUID7_ID, UUID7_ID.upper(), str(uuid.uuid4())])
def test_ulid_and_uuid_call_ids_are_accepted(call_id: str) -> None:
    """ULIDs and UUIDs in either letter case are valid call ids."""
    assert is_call_id(call_id)
    assert parse_headers({}, call_id).call_id == call_id


def test_generated_call_ids_are_accepted() -> None:
    """The ids toolbus itself generates are valid call ids."""
    assert is_call_id(new_call_id())


@pytest.mark.parametrize(
    "call_id",
    [
        "",
        "seq-12",
        "not-a-call-id",
        ULID_ID[:-1],
        ULID_ID + "0",
        "01ARZ3NDEKTSV4RRFFQ69G5FAU",  # U is not in Crockford base32
        "01ARZ3NDEKTSV4RRFFQ69G5FA.",
        UUID7_ID.replace("-", ""),
        UUID7_ID[:-1] + "g",
        "toolbus.result.x",
        "a*b",
        UUID7_ID + " ",
    ],
)
def test_other_call_ids_are_invalid_requests(call_id: str) -> None:
    """A call id that is neither a ULID nor a UUID is refused as `invalid_request`."""
    assert not is_call_id(call_id)
    with pytest.raises(InvalidRequest, match=Header.MSG_ID):
        parse_headers({}, call_id)


@pytest.mark.parametrize("call_id", [ULID_ID + "\n", UUID7_ID + "\n"])
def test_call_id_with_trailing_newline_is_invalid(call_id: str) -> None:
    """A call id followed by a newline is not a ULID or UUID (it must not become a subject token)."""
    assert not is_call_id(call_id)
    with pytest.raises(InvalidRequest):
        parse_headers({}, call_id)


def test_headers_are_carried_through() -> None:
    """Every recognised header ends up in the validated IngressHeaders."""
    headers: dict[str, str] = {
        Header.AUTHORIZATION: "Bearer k",
        Header.PRIORITY: "0",
        Header.DEADLINE: "1700000000000",
        Header.REPLY_TO: "_INBOX.abc.def",
        Header.SESSION: "sess-1",
    }
    assert parse_headers(headers, ULID_ID) == IngressHeaders(
        call_id=ULID_ID, authorization="Bearer k", priority=0, deadline_ms=1700000000000,
        reply_to="_INBOX.abc.def", session="sess-1",
    )


def test_absent_headers_get_defaults() -> None:
    """Without optional headers: no authorization, priority 2, no deadline, reply-to or session."""
    assert parse_headers({}, ULID_ID) == IngressHeaders(
        call_id=ULID_ID, authorization=None, priority=DEFAULT_PRIORITY, deadline_ms=None, reply_to=None, session=None,
    )
    assert DEFAULT_PRIORITY == 2


def test_empty_optional_headers_count_as_absent() -> None:
    """Empty priority, deadline, reply-to and session headers are treated as not sent."""
    headers: dict[str, str] = {Header.PRIORITY: "", Header.DEADLINE: "", Header.REPLY_TO: "", Header.SESSION: ""}
    parsed = parse_headers(headers, ULID_ID)
    assert (parsed.priority, parsed.deadline_ms, parsed.reply_to, parsed.session) == (2, None, None, None)


@pytest.mark.parametrize("raw", ["0", "1", "2", "3"])
def test_priorities_zero_to_three_are_accepted(raw: str) -> None:
    """Priorities 0 through 3 are accepted as integers."""
    assert parse_headers({Header.PRIORITY: raw}, ULID_ID).priority == int(raw)


@pytest.mark.parametrize("raw", ["4", "-1", "01", " 1", "1 ", "high", "1.0", "+1", "10", "٣"])
def test_other_priorities_are_invalid_requests(raw: str) -> None:
    """Any priority other than the exact strings 0..3 is refused as `invalid_request`."""
    with pytest.raises(InvalidRequest, match=Header.PRIORITY):
        parse_headers({Header.PRIORITY: raw}, ULID_ID)


@pytest.mark.parametrize("raw", ["0", "1", "1700000000000", "099"])
def test_digit_deadlines_are_epoch_milliseconds(raw: str) -> None:
    """A deadline made only of digits is taken as epoch milliseconds."""
    assert parse_headers({Header.DEADLINE: raw}, ULID_ID).deadline_ms == int(raw)


@pytest.mark.parametrize("raw", ["-1", "1.5", "1e3", " 1", "1 ", "soon", "+5", "0x10", "1_000"])
def test_non_digit_deadlines_are_invalid_requests(raw: str) -> None:
    """A deadline with anything but digits is refused as `invalid_request`."""
    with pytest.raises(InvalidRequest, match=Header.DEADLINE):
        parse_headers({Header.DEADLINE: raw}, ULID_ID)


@pytest.mark.parametrize("raw", ["²", "1²", "١٢٣", "１２３"])
def test_non_ascii_digit_deadlines_are_invalid_requests(raw: str) -> None:
    """Unicode digits other than ASCII 0-9 (superscript, Arabic-Indic, full-width) are an `invalid_request`."""
    with pytest.raises(InvalidRequest, match=Header.DEADLINE):
        parse_headers({Header.DEADLINE: raw}, ULID_ID)


@pytest.mark.parametrize("raw", ["_INBOX.x", "reply.to.me", "a", "a-b_c.$d"])
def test_publishable_reply_to_is_kept(raw: str) -> None:
    """A reply-to subject without spaces or wildcards is kept as is."""
    assert parse_headers({Header.REPLY_TO: raw}, ULID_ID).reply_to == raw
    assert usable_reply_to(raw) == raw


@pytest.mark.parametrize("raw", ["reply to", "reply.*", "reply.>", ">", "*", "a\tb", " x", "x ", "a\nb", "a\rb"])
def test_reply_to_with_spaces_or_wildcards_is_refused(raw: str) -> None:
    """A reply-to with whitespace or a wildcard is an `invalid_request` and is not usable for answering."""
    with pytest.raises(InvalidRequest, match=Header.REPLY_TO):
        parse_headers({Header.REPLY_TO: raw}, ULID_ID)
    assert usable_reply_to(raw) is None


def test_reply_to_with_trailing_newline_is_refused() -> None:
    """A reply-to ending in a newline contains whitespace and is refused like any other."""
    with pytest.raises(InvalidRequest, match=Header.REPLY_TO):
        parse_headers({Header.REPLY_TO: "reply.to\n"}, ULID_ID)
    assert usable_reply_to("reply.to\n") is None


@pytest.mark.parametrize("raw", [None, ""])
def test_missing_reply_to_is_not_usable(raw: str | None) -> None:
    """No reply-to means no extra subject to answer on."""
    assert usable_reply_to(raw) is None


# --------------------------------------------------------------------------- body


def test_valid_body_parses_into_a_request() -> None:
    """A well-formed tools/call body becomes a ToolCallRequest with its id, tool name and arguments."""
    parsed = parse_call(encode(request(params={"name": "demo__echo", "arguments": {"text": "hi"},
                                               "_meta": {"progressToken": 3}})))
    assert parsed.id == 7
    assert parsed.params.name == "demo__echo"
    assert parsed.params.arguments == {"text": "hi"}
    assert parsed.params.meta == {"progressToken": 3}


def test_string_request_id_is_kept_as_string() -> None:
    """A string JSON-RPC id stays a string, even when it looks numeric."""
    assert parse_body(encode(request(id="42")), LIMITS).id == "42"


def test_arguments_default_to_empty() -> None:
    """A call without `arguments` has empty arguments."""
    assert parse_call(encode(request(params={"name": "demo__echo"}))).params.arguments == {}


def test_body_at_the_size_limit_is_accepted() -> None:
    """A body of exactly max_body_bytes is within the limit."""
    base = encode(request(params={"name": "demo__echo", "arguments": {"text": ""}}))
    filler = "x" * (LIMITS.max_body_bytes - len(base))
    padded = encode(request(params={"name": "demo__echo", "arguments": {"text": filler}}))
    assert len(padded) == LIMITS.max_body_bytes
    assert parse_call(padded).params.arguments["text"].startswith("x")


def test_body_over_the_size_limit_is_invalid_arguments() -> None:
    """A body larger than max_body_bytes is refused as `invalid_arguments` naming both sizes."""
    body = encode(request(params={"name": "demo__echo", "arguments": {"text": "x" * 2000}}))
    with pytest.raises(InvalidArguments) as caught:
        parse_body(body, LIMITS)
    error = caught.value
    assert error.code == -32602
    assert str(len(body)) in error.message
    assert str(LIMITS.max_body_bytes) in error.message
    assert error.data == {"limit_bytes": LIMITS.max_body_bytes}


def test_size_limit_is_checked_before_parsing() -> None:
    """An oversized body is refused for its size even when it is not JSON at all."""
    with pytest.raises(InvalidArguments):
        parse_body(b"\xff" * (LIMITS.max_body_bytes + 1), LIMITS)


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"jsonrpc": "2.0",}', b"[1, 2", b"{'a': 1}", b"NaNx"])
def test_invalid_json_is_a_parse_error(body: bytes) -> None:
    """A body that is not JSON is refused as `parse_error` (-32700)."""
    with pytest.raises(ParseError) as caught:
        parse_body(body, LIMITS)
    assert caught.value.code == -32700
    assert "not valid JSON" in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"t":"\xff"}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"t":"\xc3\x28"}}}',
    ],
)
def test_invalid_utf8_is_a_parse_error(body: bytes) -> None:
    """A body with bytes that are not UTF-8 is refused as `parse_error`."""
    with pytest.raises(ParseError):
        parse_body(body, LIMITS)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(request()).encode("utf-16"),
        json.dumps(request()).encode("utf-32-le"),
        # a UTF-16 surrogate encoded as if it were a code point (CESU-8): not valid UTF-8
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"t":"\xed\xa0\x80"}}}',
    ],
    ids=["utf-16", "utf-32", "cesu-surrogate"],
)
def test_json_not_encoded_as_utf8_is_a_parse_error(body: bytes) -> None:
    """JSON on the wire must be UTF-8 (RFC 8259 §8.1): other encodings and surrogate bytes are a `parse_error`."""
    with pytest.raises(ParseError):
        parse_body(body, LIMITS)


def test_body_deeper_than_the_limit_is_invalid_arguments() -> None:
    """A body nested deeper than max_depth is refused as `invalid_arguments` naming the limit."""
    nested: Any = "leaf"
    for _ in range(LIMITS.max_depth):
        nested = [nested]
    body = encode(request(params={"name": "demo__echo", "arguments": {"deep": nested}}))
    with pytest.raises(InvalidArguments) as caught:
        parse_body(body, LIMITS)
    assert caught.value.code == -32602
    assert str(LIMITS.max_depth) in caught.value.message
    assert caught.value.data == {"max_depth": LIMITS.max_depth}


def test_body_at_the_depth_limit_is_accepted() -> None:
    """A body nested exactly max_depth levels deep is accepted."""
    nested: Any = {}
    for _ in range(LIMITS.max_depth - 4):  # request object, params, arguments, "deep" value
        nested = [nested]
    body = encode(request(params={"name": "demo__echo", "arguments": {"deep": nested}}))
    assert json_depth(json.loads(body)) == LIMITS.max_depth
    assert parse_call(body).params.arguments["deep"] == nested


def test_very_deep_valid_json_is_refused_for_depth_not_as_unparseable() -> None:
    """A valid JSON body nested far deeper than the limit is `invalid_arguments`, not a `parse_error`."""
    limits = LimitsConfig(max_body_bytes=1024 * 1024, max_depth=32)
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidArguments):
        parse_body(body, limits)


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"method": "tools/list"}, "method"),
        ({"method": "TOOLS/CALL"}, "method"),
        ({"jsonrpc": "1.0"}, "jsonrpc"),
        ({"params": None}, "params"),
        ({"params": {"name": ""}}, "params.name"),
        ({"params": {"arguments": {}}}, "params.name"),
        ({"params": {"name": "a", "arguments": [1]}}, "params.arguments"),
        ({"extra": 1}, "extra"),
        ({"id": None}, "id"),
        ({"id": 1.5}, "id"),
        ({"id": [1]}, "id"),
        ({"id": {"a": 1}}, "id"),
    ],
)
def test_invalid_requests_name_the_first_problem(overrides: dict[str, Any], where: str) -> None:
    """JSON that is not a valid tools/call request is `invalid_request` (-32600) naming where it is wrong."""
    with pytest.raises(InvalidRequest) as caught:
        parse_body(encode(request(**overrides)), LIMITS)
    assert caught.value.code == -32600
    assert where in caught.value.message


@pytest.mark.parametrize("member", ["jsonrpc", "id", "method", "params"])
def test_missing_top_level_member_is_invalid_request(member: str) -> None:
    """A request lacking jsonrpc, id, method or params is refused as `invalid_request`."""
    body = request()
    del body[member]
    with pytest.raises(InvalidRequest, match=member):
        parse_body(encode(body), LIMITS)


@pytest.mark.parametrize("decoded", [[], [request()], "tools/call", 1, None])
def test_non_object_json_is_invalid_request(decoded: Any) -> None:
    """A JSON value that is not an object (including a batch) is refused as `invalid_request`."""
    with pytest.raises(InvalidRequest):
        parse_body(encode(decoded), LIMITS)


@pytest.mark.parametrize("request_id", [True, False])
def test_boolean_request_id_is_invalid_request(request_id: bool) -> None:
    """A JSON-RPC id of true/false is not a string or integer and is refused, not coerced to 1/0."""
    with pytest.raises(InvalidRequest, match="id"):
        parse_body(encode(request(id=request_id)), LIMITS)


def test_extra_params_members_are_allowed() -> None:
    """Unknown members inside `params` are tolerated (MCP may add some)."""
    parsed = parse_call(encode(request(params={"name": "a", "task": {"ttl": 1}})))
    assert parsed.params.name == "a"


# --------------------------------------------------------------------------- request_id_of


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (encode(request(id=5)), 5),
        (encode(request(id="abc")), "abc"),
        (encode({"id": 9}), 9),
        (encode(request(id=None)), None),
        (encode(request(id=True)), None),
        (encode(request(id=1.5)), None),
        (encode(request(id=[1])), None),
        (encode({"no": "id"}), None),
        (encode([{"id": 1}]), None),
        (b"not json", None),
        (b"\xff\xfe\x00", None),
        (b"[" * 100_000, None),
    ],
)
def test_request_id_of_is_best_effort(body: bytes, expected: Any) -> None:
    """The id of an unvalidated body is read when it is a string or integer, else null."""
    assert request_id_of(body) == expected


def test_request_id_of_oversized_body_is_still_read() -> None:
    """The request id of a body over the size limit is recovered so the refusal can echo it."""
    body = encode(request(id="big", params={"name": "a", "arguments": {"t": "x" * 5000}}))
    assert len(body) > LIMITS.max_body_bytes
    assert request_id_of(body) == "big"


# --------------------------------------------------------------------------- json_depth


@pytest.mark.parametrize("value", [None, True, 0, 1.5, "", "text"])
def test_scalars_have_depth_one(value: Any) -> None:
    """A scalar JSON value has depth 1."""
    assert json_depth(value) == 1


@pytest.mark.parametrize(
    ("value", "depth"),
    [
        ([], 1),
        ({}, 1),
        ([1], 2),
        ({"a": 1}, 2),
        ([[]], 2),
        ([[[1]]], 4),
        ({"a": {"b": {"c": []}}}, 4),
        ({"a": [1, {"b": [2, [3]]}], "z": 0}, 6),
        ([1, [2], [[3]], [[[4]]]], 5),
    ],
)
def test_nested_containers_add_one_level_each(value: Any, depth: int) -> None:
    """Each list or object adds one level; the deepest branch decides."""
    assert json_depth(value) == depth


def test_keys_do_not_count_towards_depth() -> None:
    """Only values are descended into, not object keys."""
    assert json_depth({"[[[[": 1}) == 2


def test_depth_of_100000_nested_lists_without_recursion_error() -> None:
    """A 100000-deep list is measured without hitting Python's recursion limit."""
    deep: list[Any] = []
    for _ in range(99_999):
        deep = [deep]
    assert json_depth(deep) == 100_000


def reference_depth(value: Any) -> int:
    """Straightforward recursive depth: 1 plus the deepest child's depth."""
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=40,
)


@given(JSON_VALUES)
def test_json_depth_matches_recursive_reference(value: Any) -> None:
    """For any JSON-like value, json_depth equals the recursive definition of depth."""
    assert json_depth(value) == reference_depth(value)


@given(JSON_VALUES)
def test_json_depth_of_decoded_json_matches_reference(value: Any) -> None:
    """Depth is the same measured on the value or on its JSON round trip."""
    assert json_depth(json.loads(json.dumps(value))) == reference_depth(value)


# --------------------------------------------------------------------------- ArgumentValidators


def test_valid_arguments_pass() -> None:
    """Arguments matching the inputSchema are accepted."""
    validators = ArgumentValidators()
    validators.validate(spec(ECHO_SCHEMA), {"text": "hello"})
    validators.validate(spec(ECHO_SCHEMA), {"text": "hello", "times": 3})


def test_wrong_type_names_the_failing_path() -> None:
    """Arguments of the wrong type are `invalid_arguments` naming the tool and the failing path."""
    with pytest.raises(InvalidArguments) as caught:
        ArgumentValidators().validate(spec(ECHO_SCHEMA), {"text": 5})
    assert caught.value.code == -32602
    assert "demo__echo" in caught.value.message
    assert "at text:" in caught.value.message
    assert "not of type 'string'" in caught.value.message


def test_nested_failing_path_is_slash_separated() -> None:
    """A failure inside nested objects and arrays names the whole path."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"n": {"type": "integer"}}}}}}
    with pytest.raises(InvalidArguments, match="at items/1/n:"):
        ArgumentValidators().validate(spec(schema), {"items": [{"n": 1}, {"n": "two"}]})


def test_missing_required_argument_fails_at_root() -> None:
    """A missing required argument is reported at the root of the arguments."""
    with pytest.raises(InvalidArguments, match=r"at \(root\): 'text' is a required property"):
        ArgumentValidators().validate(spec(ECHO_SCHEMA), {})


def test_schema_declared_draft_is_honoured() -> None:
    """A schema declaring draft-07 is validated with draft-07 semantics."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"n": {"type": "integer", "exclusiveMaximum": 3}}}
    validator = compile_schema(schema)
    assert type(validator).__name__ == "Draft7Validator"
    with pytest.raises(InvalidArguments):
        ArgumentValidators().validate(spec(schema), {"n": 3})


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every schema `compile_schema` is asked to compile during the test, in order."""
    schemas: list[dict[str, Any]] = []
    original = validation.compile_schema

    def counting(schema: dict[str, Any]) -> Validator:
        schemas.append(schema)
        return original(schema)

    monkeypatch.setattr(validation, "compile_schema", counting)
    return schemas


def test_validator_is_compiled_once_per_registration(compiled: list[dict[str, Any]]) -> None:
    """Validating many calls of one registered tool compiles its schema once and reuses the validator."""
    validators = ArgumentValidators()
    tool = spec(ECHO_SCHEMA, registered_at_ms=100)
    for n in range(5):
        validators.validate(tool, {"text": str(n)})
    with pytest.raises(InvalidArguments):
        validators.validate(tool, {"text": 0})
    assert compiled == [ECHO_SCHEMA]
    first = validators._validator(tool)
    assert validators._validator(spec(ECHO_SCHEMA, registered_at_ms=100)) is first


def test_re_registration_recompiles(compiled: list[dict[str, Any]]) -> None:
    """A tool registered again (new registered_at_ms) gets a freshly compiled validator for its new schema."""
    validators = ArgumentValidators()
    old = spec(ECHO_SCHEMA, registered_at_ms=100)
    validators.validate(old, {"text": "a"})
    new_schema = {"type": "object", "properties": {"text": {"type": "integer"}}, "required": ["text"]}
    new = spec(new_schema, registered_at_ms=200)
    validators.validate(new, {"text": 1})
    with pytest.raises(InvalidArguments):
        validators.validate(new, {"text": "a"})
    assert compiled == [ECHO_SCHEMA, new_schema]


def test_re_registration_evicts_the_old_validator() -> None:
    """Only the latest registration of a tool is kept, so re-registrations do not grow the cache."""
    validators = ArgumentValidators()
    for registered_at_ms in range(10):
        validators.validate(spec(ECHO_SCHEMA, registered_at_ms=registered_at_ms), {"text": "a"})
    validators.validate(spec(ECHO_SCHEMA, name="demo__other"), {"text": "a"})
    assert set(validators._compiled) == {("demo__echo", 9), ("demo__other", 1)}


def test_validators_are_kept_per_tool() -> None:
    """Two tools with different schemas are validated against their own schema."""
    validators = ArgumentValidators()
    ints = spec({"type": "object", "properties": {"text": {"type": "integer"}}}, name="demo__ints")
    validators.validate(spec(ECHO_SCHEMA), {"text": "a"})
    validators.validate(ints, {"text": 1})
    with pytest.raises(InvalidArguments):
        validators.validate(ints, {"text": "a"})
    validators.validate(spec(ECHO_SCHEMA), {"text": "a"})


SLOPPY_TYPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "x": {"type": "strnig"}},
    "required": ["n"],
}


def test_invalid_type_schema_compiles_without_schema_error() -> None:
    """A schema with an unknown `type` name still compiles to a validator instead of raising SchemaError."""
    assert compile_schema(SLOPPY_TYPE_SCHEMA) is not None


def test_invalid_type_schema_still_validates_the_sound_parts() -> None:
    """With a sloppy schema, well-formed parts are still enforced (valid passes, wrong type is refused)."""
    validators = ArgumentValidators()
    validators.validate(spec(SLOPPY_TYPE_SCHEMA), {"n": 1})
    with pytest.raises(InvalidArguments, match="at n:"):
        validators.validate(spec(SLOPPY_TYPE_SCHEMA), {"n": "one"})
    with pytest.raises(InvalidArguments, match="'n' is a required property"):
        validators.validate(spec(SLOPPY_TYPE_SCHEMA), {})


@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        (SLOPPY_TYPE_SCHEMA, {"n": 1, "x": "value"}),
        ({"type": "object", "properties": {"p": {"type": "string", "pattern": "("}}}, {"p": "a"}),
        ({"$schema": ["not", "a", "uri"], "type": "object"}, {}),
    ],
    ids=["unknown-type", "invalid-pattern", "non-string-$schema"],
)
def test_sloppy_schema_never_raises_anything_but_invalid_arguments(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    """A sloppy backend schema either accepts the arguments or refuses them as `invalid_arguments`, never crashes."""
    with contextlib.suppress(InvalidArguments):
        ArgumentValidators().validate(spec(schema), arguments)


def parse_call(body: bytes) -> ToolCallRequest:
    """`parse_body` of a body that must be a `tools/call`."""
    parsed = parse_body(body, LIMITS)
    assert isinstance(parsed, ToolCallRequest)
    return parsed


def test_resource_reads_and_prompt_gets_are_parsed_as_such() -> None:
    """The bus also carries `resources/read` and `prompts/get`, each as its own request model."""
    read = parse_body(encode({"jsonrpc": "2.0", "id": 1, "method": "resources/read",
                              "params": {"uri": "demo://readme"}}), LIMITS)
    got = parse_body(encode({"jsonrpc": "2.0", "id": 2, "method": "prompts/get",
                             "params": {"name": "demo__review", "arguments": {"code": "x"}}}), LIMITS)
    assert isinstance(read, ResourceReadRequest) and read.params.uri == "demo://readme"
    assert isinstance(got, PromptGetRequest) and got.params.arguments == {"code": "x"}


@pytest.mark.parametrize("method", ["tools/list", "resources/list", "", None, 7])
def test_other_methods_are_refused_naming_the_ones_the_bus_carries(method: object) -> None:
    with pytest.raises(InvalidRequest, match="method must be one of tools/call, resources/read, prompts/get"):
        parse_body(encode({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}), LIMITS)


def test_prompt_arguments_must_be_strings() -> None:
    """MCP prompt arguments are strings; a number is refused naming the argument."""
    body = encode({"jsonrpc": "2.0", "id": 1, "method": "prompts/get",
                   "params": {"name": "demo__review", "arguments": {"code": 1}}})
    with pytest.raises(InvalidRequest, match=r"params\.arguments\.code"):
        parse_body(body, LIMITS)

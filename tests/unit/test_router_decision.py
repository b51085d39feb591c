"""Unit tests for services.router.decision: routing or refusing one call, and the order of checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.router import decision as decision_module
from services.router.decision import Decision, RoutingTable
from shared.codec import pack, unpack
from shared.config import Config, hash_api_key
from shared.contracts import ToolSpec, WorkItem
from shared.errors import (
    CallRefused,
    DeadlineExceeded,
    Forbidden,
    InvalidArguments,
    InvalidRequest,
    ParseError,
    ToolbusError,
    Unauthenticated,
    UnknownTool,
)
from shared.outcomes import now_ms
from shared.subjects import Header
from tests.conftest import ADMIN_KEY, ALICE_KEY, make_config

pytestmark = pytest.mark.unit

CALL_ID = "0190b8a4-3c1e-7d2a-9f00-1234567890ab"
NOW_MS = 1_750_000_000_000
UNUSED_REPO = Path("unused-git-repo")  # only named in the git server's args; nothing is started
ECHO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


def tool_spec(public_name: str, schema: dict[str, Any] | None = None) -> ToolSpec:
    """A registered tool of the `demo` server in the default pool."""
    return ToolSpec(
        public_name=public_name, server="demo", pool="default", tool=public_name.removeprefix("demo__"),
        input_schema=ECHO_SCHEMA if schema is None else schema, registered_at_ms=1,
    )


ECHO = tool_spec("demo__echo")
CRASH = tool_spec("demo__crash", {"type": "object"})


@pytest.fixture(scope="module")
def config() -> Config:
    """The test mesh's config (nothing is started, so any repo path will do)."""
    return make_config(UNUSED_REPO)


@pytest.fixture
def table(config: Config) -> RoutingTable:
    """A routing table knowing demo__echo and demo__crash."""
    return RoutingTable(config, {ECHO.public_name: ECHO, CRASH.public_name: CRASH})


def body(tool: str = "demo__echo", arguments: Any = None, request_id: Any = 7, **params: Any) -> bytes:
    """A tools/call request body."""
    call_params = {"name": tool, "arguments": {"text": "hi"} if arguments is None else arguments, **params}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": call_params}).encode()


def headers(key: str | None = ALICE_KEY, **extra: str) -> dict[str, str]:
    """Ingress headers with a bearer key (none when key is None) and any extra headers."""
    result: dict[str, str] = {} if key is None else {Header.AUTHORIZATION: f"Bearer {key}"}
    result.update(extra)
    return result


def refused(decision: Decision, kind: type[ToolbusError]) -> ToolbusError:
    """Assert the decision is a refusal of exactly `kind` with no work, and return the refusal."""
    assert decision.work is None
    assert type(decision.refusal) is kind, decision.refusal
    assert decision.refusal is not None
    return decision.refusal


# --------------------------------------------------------------------------- routed calls


def test_good_call_becomes_a_work_item(table: RoutingTable) -> None:
    """An authenticated, allowed, valid call yields a WorkItem carrying everything the executor needs."""
    deadline = now_ms() + 60_000
    hdrs = headers(**{Header.PRIORITY: "1", Header.DEADLINE: str(deadline),
                      Header.REPLY_TO: "_INBOX.reply.1", Header.SESSION: "sess-9"})
    before = now_ms()
    decision = table.decide(hdrs, body(_meta={"progressToken": "p1"}), CALL_ID)
    after = now_ms()
    assert decision.refusal is None
    work = decision.work
    assert work is not None
    assert before <= work.accepted_at_ms <= after
    assert work == WorkItem(
        call_id=CALL_ID, request_id=7, public_tool="demo__echo", server="demo", tool="echo", pool="default",
        arguments={"text": "hi"}, meta={"progressToken": "p1"}, principal="alice", priority=1,
        deadline_ms=deadline, reply_to="_INBOX.reply.1", session="sess-9", accepted_at_ms=work.accepted_at_ms,
    )
    assert (decision.call_id, decision.request_id, decision.principal, decision.tool, decision.reply_to) == (
        CALL_ID, 7, "alice", "demo__echo", "_INBOX.reply.1")


def test_good_call_defaults(table: RoutingTable) -> None:
    """Without optional headers the work item has priority 2 and no deadline, reply-to, session or meta."""
    decision = table.decide(headers(), body(request_id="req-1"), CALL_ID)
    work = decision.work
    assert work is not None
    assert (work.priority, work.deadline_ms, work.reply_to, work.session, work.meta) == (2, None, None, None, None)
    assert work.request_id == "req-1"
    assert decision.reply_to is None


def test_work_item_uses_the_registered_spec(config: Config) -> None:
    """Server, backend tool name and pool come from the registered ToolSpec, not from the public name."""
    spec = ToolSpec(public_name="demo__echo", server="other", pool="fast", tool="echo_v2",
                    input_schema=ECHO_SCHEMA, registered_at_ms=1)
    work = RoutingTable(config, {"demo__echo": spec}).decide(headers(), body(), CALL_ID).work
    assert work is not None
    assert (work.public_tool, work.server, work.tool, work.pool) == ("demo__echo", "other", "echo_v2", "fast")


def test_admin_may_call_what_alice_may_not(table: RoutingTable) -> None:
    """The admin role's `*` glob routes a tool the analyst role denies."""
    work = table.decide(headers(ADMIN_KEY), body("demo__crash", {}), CALL_ID).work
    assert work is not None
    assert work.principal == "admin"


def test_deadline_in_the_future_is_routed(table: RoutingTable, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deadline one millisecond after now is still routed."""
    monkeypatch.setattr(decision_module, "now_ms", lambda: NOW_MS)
    decision = table.decide(headers(**{Header.DEADLINE: str(NOW_MS + 1)}), body(), CALL_ID)
    assert decision.work is not None
    assert decision.work.deadline_ms == NOW_MS + 1


# --------------------------------------------------------------------------- refusals


def test_unparseable_body_is_a_parse_error(table: RoutingTable) -> None:
    """A body that is not JSON is refused as `parse_error` with nothing known about it."""
    decision = table.decide(headers(), b"{not json", CALL_ID)
    refused(decision, ParseError)
    assert (decision.request_id, decision.principal, decision.tool) == (None, None, None)


def test_invalid_request_keeps_the_readable_request_id(table: RoutingTable) -> None:
    """A JSON body that is not a tools/call request is `invalid_request` and still echoes its id."""
    raw = json.dumps({"jsonrpc": "2.0", "id": "r-5", "method": "tools/list", "params": {"name": "demo__echo"}})
    decision = table.decide(headers(), raw.encode(), CALL_ID)
    refused(decision, InvalidRequest)
    assert decision.request_id == "r-5"
    assert decision.principal is None


@pytest.mark.parametrize(
    ("call_id", "extra"),
    [
        ("seq-12", {}),
        (CALL_ID, {Header.PRIORITY: "9"}),
        (CALL_ID, {Header.DEADLINE: "tomorrow"}),
        (CALL_ID, {Header.REPLY_TO: "reply.*"}),
        (CALL_ID, {Header.SESSION: "../../etc"}),
        (CALL_ID, {Header.SESSION: "s" * 129}),
    ],
)
def test_malformed_headers_are_invalid_requests(table: RoutingTable, call_id: str, extra: dict[str, str]) -> None:
    """A bad call id, priority, deadline, reply-to or session is `invalid_request`, decided before authentication."""
    decision = table.decide(headers(**extra), body(), call_id)
    refused(decision, InvalidRequest)
    assert decision.principal is None
    assert decision.tool == "demo__echo"
    assert decision.request_id == 7


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_bad_key_is_unauthenticated(table: RoutingTable, key: str | None) -> None:
    """A missing or unknown key is refused as `unauthenticated` and no principal is recorded."""
    decision = table.decide(headers(key), body(), CALL_ID)
    refused(decision, Unauthenticated)
    assert decision.principal is None


def test_denied_tool_is_forbidden(table: RoutingTable) -> None:
    """A registered tool the principal's roles deny is refused as `forbidden`."""
    decision = table.decide(headers(), body("demo__crash", {}), CALL_ID)
    refused(decision, Forbidden)
    assert decision.principal == "alice"
    assert decision.tool == "demo__crash"


def test_unregistered_allowed_tool_is_unknown(table: RoutingTable) -> None:
    """An allowed but unregistered tool is refused as `unknown_tool`."""
    decision = table.decide(headers(), body("demo__nope"), CALL_ID)
    refused(decision, UnknownTool)
    assert decision.principal == "alice"


def test_arguments_failing_the_schema_are_invalid_arguments(table: RoutingTable) -> None:
    """Arguments that fail the tool's inputSchema are refused as `invalid_arguments`."""
    decision = table.decide(headers(), body(arguments={"text": 5}), CALL_ID)
    error = refused(decision, InvalidArguments)
    assert "text" in error.message
    decision = table.decide(headers(), body(arguments={}), CALL_ID)
    refused(decision, InvalidArguments)


def test_oversized_body_is_invalid_arguments_with_its_id(table: RoutingTable, config: Config) -> None:
    """A body over max_body_bytes is refused as `invalid_arguments` and still echoes the request id."""
    raw = body(arguments={"text": "x" * config.limits.max_body_bytes}, request_id="big")
    decision = table.decide(headers(), raw, CALL_ID)
    refused(decision, InvalidArguments)
    assert decision.request_id == "big"
    assert decision.tool is None


def test_too_deep_arguments_are_invalid_arguments(table: RoutingTable, config: Config) -> None:
    """Arguments nested deeper than max_depth are refused as `invalid_arguments`."""
    nested: Any = "x"
    for _ in range(config.limits.max_depth):
        nested = [nested]
    decision = table.decide(headers(), body(arguments={"text": "a", "deep": nested}), CALL_ID)
    refused(decision, InvalidArguments)


@pytest.mark.parametrize("offset_ms", [0, -1, -60_000])
def test_passed_deadline_is_deadline_exceeded(
    table: RoutingTable, monkeypatch: pytest.MonkeyPatch, offset_ms: int
) -> None:
    """A deadline at or before now is refused as `deadline_exceeded` and never routed."""
    monkeypatch.setattr(decision_module, "now_ms", lambda: NOW_MS)
    decision = table.decide(headers(**{Header.DEADLINE: str(NOW_MS + offset_ms)}), body(), CALL_ID)
    error = refused(decision, DeadlineExceeded)
    assert error.code == -32008
    assert decision.principal == "alice"


def test_epoch_zero_deadline_is_expired(table: RoutingTable) -> None:
    """A deadline of 0 ms is long past."""
    refused(table.decide(headers(**{Header.DEADLINE: "0"}), body(), CALL_ID), DeadlineExceeded)


# --------------------------------------------------------------------------- ordering facts


def test_forbidden_beats_unknown_tool(table: RoutingTable) -> None:
    """A tool that is both forbidden and unregistered is `forbidden`: the caller learns nothing about it."""
    assert "git__git_commit" not in table.tools
    refused(table.decide(headers(), body("git__git_commit"), CALL_ID), Forbidden)
    refused(table.decide(headers(), body("secret__anything"), CALL_ID), Forbidden)


def test_forbidden_registered_and_unregistered_look_the_same(table: RoutingTable) -> None:
    """Refusals of a registered and an unregistered forbidden tool differ only in the tool name."""
    registered = table.decide(headers(), body("demo__crash", {}), CALL_ID).refusal
    unregistered = table.decide(headers(), body("git__git_commit", {}), CALL_ID).refusal
    assert registered is not None
    assert unregistered is not None
    assert registered.to_jsonrpc(CALL_ID)["data"] == unregistered.to_jsonrpc(CALL_ID)["data"]
    assert registered.message.replace("demo__crash", "T") == unregistered.message.replace("git__git_commit", "T")


def test_unauthenticated_beats_unknown_tool(table: RoutingTable) -> None:
    """An unauthenticated call to an unregistered tool is `unauthenticated`."""
    refused(table.decide(headers("wrong"), body("demo__nope"), CALL_ID), Unauthenticated)
    refused(table.decide(headers(None), body("nope__nope"), CALL_ID), Unauthenticated)


def test_unauthenticated_beats_forbidden_and_bad_arguments(table: RoutingTable) -> None:
    """Authentication is checked before authorization and arguments."""
    refused(table.decide(headers("wrong"), body("demo__crash", {"x": 1}), CALL_ID), Unauthenticated)
    refused(table.decide(headers("wrong"), body(arguments={"text": 5}), CALL_ID), Unauthenticated)


def test_forbidden_beats_invalid_arguments(table: RoutingTable) -> None:
    """Arguments of a tool the caller may not call are never checked against its schema."""
    refused(table.decide(headers(), body("demo__crash", {"any": "thing"}), CALL_ID), Forbidden)


def test_invalid_arguments_beat_expired_deadline(table: RoutingTable) -> None:
    """A call both malformed and expired is refused for its arguments."""
    refused(table.decide(headers(**{Header.DEADLINE: "1"}), body(arguments={"text": 5}), CALL_ID), InvalidArguments)


def test_unauthenticated_beats_expired_deadline(table: RoutingTable) -> None:
    """An expired call with a bad key is `unauthenticated` (no principal learns about its deadline)."""
    refused(table.decide(headers("wrong", **{Header.DEADLINE: "1"}), body(), CALL_ID), Unauthenticated)


def test_parse_error_beats_bad_headers(table: RoutingTable) -> None:
    """The body is parsed before the headers are validated."""
    refused(table.decide(headers(None, **{Header.PRIORITY: "x"}), b"nope", "bad-id"), ParseError)


def test_principal_is_recorded_only_once_authenticated(table: RoutingTable) -> None:
    """`decision.principal` is None before authentication succeeds and the principal's name after."""
    assert table.decide(headers(), b"{", CALL_ID).principal is None
    assert table.decide(headers(**{Header.PRIORITY: "7"}), body(), CALL_ID).principal is None
    assert table.decide(headers("wrong"), body(), CALL_ID).principal is None
    assert table.decide(headers(), body("demo__crash", {}), CALL_ID).principal == "alice"
    assert table.decide(headers(), body("demo__nope"), CALL_ID).principal == "alice"
    assert table.decide(headers(), body(), CALL_ID).principal == "alice"


def test_principal_name_never_the_key(table: RoutingTable) -> None:
    """Nothing in a decision carries the API key or its hash."""
    for decision in (table.decide(headers(), body(), CALL_ID), table.decide(headers(), body("demo__nope"), CALL_ID)):
        text = repr(decision)
        assert ALICE_KEY not in text
        assert hash_api_key(ALICE_KEY) not in text


# --------------------------------------------------------------------------- reply-to


def test_invalid_reply_to_is_not_used_to_answer(table: RoutingTable) -> None:
    """A reply-to with wildcards makes the call invalid and is not kept as the subject to answer on."""
    decision = table.decide(headers(**{Header.REPLY_TO: "evil.>"}), body(), CALL_ID)
    refused(decision, InvalidRequest)
    assert decision.reply_to is None


def test_valid_reply_to_is_kept_on_refusals(table: RoutingTable) -> None:
    """A publishable reply-to is used to answer even calls refused before the headers were validated."""
    decision = table.decide(headers("wrong", **{Header.REPLY_TO: "_INBOX.x"}), b"{", CALL_ID)
    refused(decision, ParseError)
    assert decision.reply_to == "_INBOX.x"


def test_reply_to_with_trailing_newline_is_not_used(table: RoutingTable) -> None:
    """A reply-to ending in a newline is refused and not used as the subject to answer on."""
    decision = table.decide(headers(**{Header.REPLY_TO: "_INBOX.x\n"}), body(), CALL_ID)
    refused(decision, InvalidRequest)
    assert decision.reply_to is None


# --------------------------------------------------------------------------- config changes


def test_with_config_keeps_tools_and_validators(table: RoutingTable, config: Config) -> None:
    """A new config keeps the registered tools and compiled validators but applies its own principals."""
    without_principals = config.model_copy(update={"principals": []})
    updated = table.with_config(without_principals)
    assert updated.tools is table.tools
    assert updated.validators is table.validators
    refused(updated.decide(headers(), body(), CALL_ID), Unauthenticated)
    assert table.decide(headers(), body(), CALL_ID).work is not None


# --------------------------------------------------------------------------- never raises


@pytest.mark.parametrize("deadline", ["²", "١٢٣"])
def test_non_ascii_digit_deadline_is_refused_not_raised(table: RoutingTable, deadline: str) -> None:
    """A deadline of non-ASCII digits is returned as an `invalid_request` refusal (decide never raises)."""
    refused(table.decide(headers(**{Header.DEADLINE: deadline}), body(), CALL_ID), InvalidRequest)


def test_sloppy_schema_is_refused_or_routed_not_raised(config: Config) -> None:
    """A tool whose schema has an unknown `type` name is still routed or refused, never raises."""
    sloppy = tool_spec("demo__sloppy", {"type": "object", "properties": {"text": {"type": "strnig"}}})
    decision = RoutingTable(config, {sloppy.public_name: sloppy}).decide(headers(), body("demo__sloppy"), CALL_ID)
    assert (decision.work is None) != (decision.refusal is None)


HEADER_TEXT = st.text(max_size=20)
SHARED_TABLE = RoutingTable(make_config(UNUSED_REPO), {ECHO.public_name: ECHO})


@given(
    raw=st.one_of(st.binary(max_size=200), st.builds(body, st.text(max_size=15), st.dictionaries(
        st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))),
    call_id=st.sampled_from([CALL_ID, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "x"]),
    priority=HEADER_TEXT, deadline=HEADER_TEXT, reply_to=HEADER_TEXT,
)
@example(raw=body(), call_id=CALL_ID, priority="", deadline="²", reply_to="")
def test_decide_never_raises(raw: bytes, call_id: str, priority: str, deadline: str, reply_to: str) -> None:
    """For any body and header values, decide returns exactly one of work or refusal and raises nothing."""
    hdrs = headers(**{Header.PRIORITY: priority, Header.DEADLINE: deadline, Header.REPLY_TO: reply_to})
    decision = SHARED_TABLE.decide(hdrs, raw, call_id)
    assert (decision.work is None) != (decision.refusal is None)


def test_lone_surrogate_argument_is_refused_not_routed(table: RoutingTable) -> None:
    """A string argument holding a lone UTF-16 surrogate (`\\ud800`) is refused, since no UTF-8 message can carry it."""
    raw = body(arguments={"text": "\ud800"})  # json.dumps writes it as the ASCII escape \ud800
    assert b"\\ud800" in raw
    decision = table.decide(headers(), raw, CALL_ID)
    assert decision.work is None
    assert isinstance(decision.refusal, CallRefused)


def test_every_routed_work_item_can_be_packed(table: RoutingTable) -> None:
    """A work item the router accepts can be encoded for the WORK stream."""
    decision = table.decide(headers(), body(arguments={"text": "héllo ✓ \U0001f600"}), CALL_ID)
    assert decision.work is not None
    assert unpack(WorkItem, pack(decision.work)) == decision.work

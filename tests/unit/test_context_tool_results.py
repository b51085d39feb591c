"""Unit tests for services.context.tool_results: the text of a tool result as a TOOL block, and its size cap.

`describe_result` turns an MCP `tools/call` response (or a JSON-RPC error) into the text an agent
reads, never copying base64 payloads into it; `truncate` caps that text in UTF-8 bytes on a
character boundary and says how much it cut.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.context.tool_results import TRUNCATED, block_id, describe_result, truncate
from shared.contracts.context import BLOCK_ID_PATTERN

pytestmark = [pytest.mark.unit]

PROPERTY = settings(max_examples=300, deadline=None, database=None)
PAYLOAD = base64.b64encode(bytes(range(256)) * 12).decode()  # 4096 base64 characters
MARKER = re.compile(r"\n\[truncated: (\d+) more bytes\]\Z")


def result(*content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON-RPC response carrying a tools/call result."""
    return {"jsonrpc": "2.0", "id": "1", "result": {"content": list(content), **extra}}


def test_a_text_item_is_the_text() -> None:
    """A single text item is rendered as its text, not an error."""
    assert describe_result(result({"type": "text", "text": "On branch main\nnothing to commit"})) == (
        "On branch main\nnothing to commit", False)


def test_text_items_are_joined_by_newlines_and_empty_ones_skipped() -> None:
    """Several items are joined one per line, leaving out empty ones."""
    response = result({"type": "text", "text": "first"}, {"type": "text", "text": ""}, {"type": "text", "text": "東京"})
    assert describe_result(response) == ("first\n東京", False)


def test_structured_content_alone_is_rendered_as_sorted_json() -> None:
    """Without text, structuredContent is the text: JSON with sorted keys and unescaped unicode."""
    response = result(structuredContent={"zone": "Asia/Tokyo", "city": "東京", "offset": 9})
    text, is_error = describe_result(response)
    assert text == '{"city": "東京", "offset": 9, "zone": "Asia/Tokyo"}' and not is_error
    assert json.loads(text) == {"zone": "Asia/Tokyo", "city": "東京", "offset": 9}
    assert describe_result(result({"type": "text", "text": ""}, structuredContent=[1, 2])) == ("[1, 2]", False)


def test_text_wins_over_structured_content() -> None:
    """When the content has text, structuredContent is not repeated."""
    response = result({"type": "text", "text": '{"a": 1}'}, structuredContent={"a": 1})
    assert describe_result(response) == ('{"a": 1}', False)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_binary_content_is_described_without_its_base64(kind: str) -> None:
    """Image and audio items are summarized by type, MIME type and size; their base64 never enters the text."""
    response = result({"type": "text", "text": "a chart:"}, {"type": kind, "data": PAYLOAD, "mimeType": "image/png"})
    text, is_error = describe_result(response)
    assert text == f"a chart:\n[{kind} image/png, 4096 base64 chars]" and not is_error
    assert PAYLOAD[:16] not in text


def test_an_embedded_resource_shows_its_text_or_only_its_uri() -> None:
    """A text resource is its text; a blob resource is named by its URI without its base64."""
    text_resource = {"type": "resource", "resource": {"uri": "file:///README.md", "text": "# toolbus"}}
    blob_resource = {"type": "resource", "resource": {"uri": "file:///logo.png", "blob": PAYLOAD,
                                                      "mimeType": "image/png"}}
    text, is_error = describe_result(result(text_resource, blob_resource))
    assert text == "# toolbus\n[resource file:///logo.png]" and not is_error
    assert PAYLOAD[:16] not in text


def test_a_resource_link_is_named_by_its_uri() -> None:
    """A resource_link item is rendered as a link to its URI."""
    link = {"type": "resource_link", "uri": "file:///src/app.py", "name": "app.py"}
    assert describe_result(result(link)) == ("[resource link file:///src/app.py]", False)


def test_a_tool_error_result_is_flagged_and_keeps_its_text() -> None:
    """A result with isError is an error, and its text is what the tool said."""
    response = result({"type": "text", "text": "fatal: not a git repository"}, isError=True)
    assert describe_result(response) == ("fatal: not a git repository", True)


def test_a_json_rpc_error_is_described_with_code_reason_and_message() -> None:
    """A JSON-RPC error becomes `error <code> (<reason>): <message>`, flagged as an error."""
    response = {"jsonrpc": "2.0", "id": "1",
                "error": {"code": -32602, "message": "missing 'repo_path'", "data": {"reason": "invalid_arguments"}}}
    assert describe_result(response) == ("error -32602 (invalid_arguments): missing 'repo_path'", True)
    bare = {"jsonrpc": "2.0", "id": "1", "error": {"code": -32603, "message": "boom", "data": None}}
    assert describe_result(bare) == ("error -32603 (error): boom", True)


def test_an_empty_result_is_empty_text() -> None:
    """A result without content (or a response without a result) is the empty text, not an error."""
    assert describe_result(result()) == ("", False)
    assert describe_result({"jsonrpc": "2.0", "id": "1"}) == ("", False)


def test_a_block_id_is_derived_from_the_call_id() -> None:
    """A call's TOOL block id is `call:<call id>`, a valid block id."""
    call_id = str(uuid.uuid4())
    assert block_id(call_id) == f"call:{call_id}"
    assert re.fullmatch(BLOCK_ID_PATTERN, block_id(call_id))


def test_text_within_the_limit_is_unchanged() -> None:
    """Text of at most the limit in bytes is returned as it is."""
    assert truncate("東京", 6) == "東京"
    assert truncate("", 0) == ""


def test_a_cut_is_marked_with_the_bytes_dropped() -> None:
    """Cut text ends with a marker giving the number of bytes left out."""
    out = truncate("x" * 1000, 100)
    marker = MARKER.search(out)
    assert marker is not None
    kept = out[: marker.start()]
    assert kept == "x" * len(kept) and int(marker.group(1)) == 1000 - len(kept)
    assert len(out.encode()) <= 100


@PROPERTY
@given(text=st.one_of(st.text(min_size=1), st.text(alphabet="é東🙂\u200d", min_size=1, max_size=300)),
       slack=st.integers(0, 400))
def test_a_cut_fits_the_limit_on_a_character_boundary(text: str, slack: int) -> None:
    """A limit with room for the marker is never exceeded; the kept part is a whole-character prefix of the text."""
    raw = text.encode()
    limit = len(TRUNCATED.format(dropped=len(raw)).encode()) + slack
    out = truncate(text, limit)
    assert len(out.encode()) <= limit
    if len(raw) <= limit:
        assert out == text
        return
    marker = MARKER.search(out)
    assert marker is not None
    kept = out[: marker.start()]
    assert text.startswith(kept)  # whole characters: no replacement character, no split sequence
    assert int(marker.group(1)) == len(raw) - len(kept.encode())
    assert len(kept.encode()) > limit - len(TRUNCATED.format(dropped=len(raw)).encode()) - 4  # at most one char short


def test_a_limit_smaller_than_the_marker_is_not_exceeded() -> None:
    """Even a limit smaller than the truncation marker is never exceeded: the text is cut without a marker."""
    assert truncate("x" * 100, 5) == "xxxxx"
    assert truncate("éé", 3) == "é"

"""A raw nats-py producer, following DESIGN.md §5 with no toolbus import, gets MCP results and errors.

The producer below uses only nats-py, json and uuid: the wire contract must be enough.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import nats
import pytest

from tests.conftest import ADMIN_KEY, ALICE_KEY
from tests.helpers import InProcessMesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


async def raw_call(
    nats_url: str,
    body: bytes | dict[str, Any],
    *,
    key: str | None = ALICE_KEY,
    extra_headers: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Publish one call exactly as DESIGN.md §5 says and return (JSON-RPC response, headers)."""
    nc = await nats.connect(nats_url)
    try:
        call_id = str(uuid.uuid4())
        results = await nc.subscribe(f"toolbus.result.{call_id}", max_msgs=1)
        headers = {"Nats-Msg-Id": call_id, **(extra_headers or {})}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        ack = await nc.jetstream().publish("toolbus.call", payload, headers=headers)
        assert ack.stream == "CALLS"
        msg = await results.next_msg(timeout=30)
        assert msg.headers is not None and msg.headers["Toolbus-Call-Id"] == call_id
        return json.loads(msg.data), dict(msg.headers)
    finally:
        await nc.close()


def tools_call(name: str, arguments: dict[str, Any], request_id: int | str = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}


async def test_time_server_answers_through_the_bus(mesh: InProcessMesh) -> None:
    """mcp-server-time's get_current_time returns its structured result with the producer's id."""
    response, headers = await raw_call(mesh.nats_url, tools_call("time__get_current_time", {"timezone": "UTC"}))
    assert headers["Toolbus-Status"] == "ok"
    assert response["id"] == 7 and response["jsonrpc"] == "2.0"
    assert response["result"]["isError"] is False
    assert response["result"]["structuredContent"]["timezone"] == "UTC"


async def test_git_server_answers_through_the_bus(mesh: InProcessMesh) -> None:
    """mcp-server-git's git_log shows the test repository's commit."""
    repo = mesh.config.servers["git"].args[-1]
    response, headers = await raw_call(mesh.nats_url, tools_call("git__git_log", {"repo_path": repo}))
    assert headers["Toolbus-Status"] == "ok"
    assert "first commit" in response["result"]["content"][0]["text"]


async def test_demo_echo_and_usage_meta_pass_through(mesh: InProcessMesh) -> None:
    """Demo tools answer, and a tool's `_meta.usage` reaches the producer unchanged."""
    echo, _ = await raw_call(mesh.nats_url, tools_call("demo__echo", {"text": "héllo"}, request_id="a-string-id"))
    assert echo["id"] == "a-string-id"
    assert echo["result"]["content"] == [{"type": "text", "text": "héllo"}]
    summary, _ = await raw_call(mesh.nats_url, tools_call("demo__summarize", {"text": "one two three", "max_words": 2}))
    assert summary["result"]["_meta"]["usage"]["input_tokens"] == 3


async def test_tool_error_is_a_result_not_a_jsonrpc_error(mesh: InProcessMesh) -> None:
    """A tool's own failure is an MCP result with isError true and status tool_error."""
    response, headers = await raw_call(mesh.nats_url, tools_call("demo__fail", {"message": "nope"}))
    assert headers["Toolbus-Status"] == "tool_error"
    assert "error" not in response
    assert response["result"]["isError"] is True


@pytest.mark.parametrize(
    ("case", "body", "key", "code", "reason"),
    [
        ("unknown tool", tools_call("demo__nope", {}), ALICE_KEY, -32601, "unknown_tool"),
        ("missing key", tools_call("demo__echo", {"text": "x"}), None, -32001, "unauthenticated"),
        ("wrong key", tools_call("demo__echo", {"text": "x"}), "not-a-key", -32001, "unauthenticated"),
        ("forbidden tool", tools_call("git__git_commit", {"repo_path": ".", "message": "m"}), ALICE_KEY, -32003,
         "forbidden"),
        ("denied by glob", tools_call("demo__crash", {}), ALICE_KEY, -32003, "forbidden"),
        ("invalid arguments", tools_call("demo__echo", {"text": 42}), ALICE_KEY, -32602, "invalid_arguments"),
        ("missing argument", tools_call("demo__echo", {}), ALICE_KEY, -32602, "invalid_arguments"),
        ("malformed json", b'{"jsonrpc": "2.0", "id": 1, "method": ', ALICE_KEY, -32700, "parse_error"),
        ("not utf-8", b"\xff\xfe\x00garbage", ALICE_KEY, -32700, "parse_error"),
        ("wrong method", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, ALICE_KEY, -32600, "invalid_request"),
        ("body over the limit", tools_call("demo__echo", {"text": "x" * 70_000}), ALICE_KEY, -32602,
         "invalid_arguments"),
        ("too deeply nested", tools_call("demo__echo", {"text": "x", "n": json.loads("[" * 40 + "]" * 40)}),
         ALICE_KEY, -32602, "invalid_arguments"),
    ],
)
async def test_bad_calls_get_documented_errors(
    mesh: InProcessMesh, case: str, body: dict[str, Any] | bytes, key: str | None, code: int, reason: str
) -> None:
    """Each kind of bad call gets its JSON-RPC error code and reason, and status rejected."""
    response, headers = await raw_call(mesh.nats_url, body, key=key)
    assert headers["Toolbus-Status"] == "rejected", case
    assert response["error"]["code"] == code, (case, response)
    assert response["error"]["data"]["reason"] == reason
    assert response["error"]["message"], "the message must say why"
    assert "Traceback" not in json.dumps(response)


async def test_expired_deadline_is_never_executed(mesh: InProcessMesh) -> None:
    """A call whose deadline already passed gets deadline_exceeded and status timeout."""
    past = str(int(time.time() * 1000) - 1000)
    response, headers = await raw_call(mesh.nats_url, tools_call("demo__echo", {"text": "late"}),
                                       extra_headers={"Toolbus-Deadline": past})
    assert headers["Toolbus-Status"] == "timeout"
    assert response["error"]["code"] == -32008


async def test_bad_headers_are_invalid_requests(mesh: InProcessMesh) -> None:
    """A priority outside 0..3 is refused as invalid_request."""
    response, _ = await raw_call(mesh.nats_url, tools_call("demo__echo", {"text": "x"}),
                                 extra_headers={"Toolbus-Priority": "9"})
    assert response["error"]["code"] == -32600


async def test_result_also_goes_to_reply_to(mesh: InProcessMesh) -> None:
    """With Toolbus-Reply-To the final result is also published to that subject."""
    nc = await nats.connect(mesh.nats_url)
    try:
        call_id, reply = str(uuid.uuid4()), f"my.replies.{uuid.uuid4().hex}"
        inbox = await nc.subscribe(reply, max_msgs=1)
        headers = {"Nats-Msg-Id": call_id, "Authorization": f"Bearer {ADMIN_KEY}", "Toolbus-Reply-To": reply}
        await nc.jetstream().publish("toolbus.call", json.dumps(tools_call("demo__echo", {"text": "r"})).encode(),
                                     headers=headers)
        msg = await inbox.next_msg(timeout=30)
        assert json.loads(msg.data)["result"]["content"][0]["text"] == "r"
    finally:
        await nc.close()


async def test_services_survive_a_burst_of_garbage(mesh: InProcessMesh) -> None:
    """After 50 malformed messages the mesh still answers a good call."""
    nc = await nats.connect(mesh.nats_url)
    try:
        js = nc.jetstream()
        await asyncio.gather(*(js.publish("toolbus.call", bytes([i]) * i, headers={"Nats-Msg-Id": str(uuid.uuid4())})
                               for i in range(50)))
    finally:
        await nc.close()
    response, _ = await raw_call(mesh.nats_url, tools_call("demo__echo", {"text": "still here"}))
    assert response["result"]["content"][0]["text"] == "still here"

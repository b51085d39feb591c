"""The producer SDK: publish MCP tool calls to the bus and await their results.

    async with ToolbusClient("nats://127.0.0.1:4222", api_key) as client:
        result = await client.call("time__get_current_time", {"timezone": "UTC"})
        print(result.text)

It follows DESIGN.md §5 and nothing else: a JetStream publish to `toolbus.call` with the
documented headers, the result read from a reply subject or, after a reconnect or a lost
reply, from the RESULTS stream by call id. A raw nats-py producer can do exactly the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError
from pydantic import SecretStr

from shared.bus import servers_of
from shared.codec import dump_json
from shared.context_client import ContextClient
from shared.contracts import CallStatus, ToolCallResponse
from shared.errors import CallFailed
from shared.ids import new_call_id
from shared.subjects import CONTENT_JSON, DEFAULT_PREFIX, Header, Stream, Subjects
from shared.telemetry import trace_headers, tracer

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_S = 60.0
INTERNAL_ERROR = -32603
# What a request to JetStream raises while nats-server restarts or JetStream is still recovering.
_BUS_AWAY = (NatsTimeoutError, NoRespondersError, ServiceUnavailableError)


ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]
"""Receives the `params` of one `notifications/progress` a running tool sent."""

LogCallback = Callable[[dict[str, Any]], Awaitable[None]]
"""Receives the `params` (`level`, `logger`, `data`) of one `notifications/message` a running tool
logged. Backends log only for calls whose `meta` carries `io.modelcontextprotocol/logLevel`."""

InputHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Answers a running tool's question to its caller: `(method, params)` of a `sampling/createMessage`
or `elicitation/create` request → the MCP result. Raising `CallFailed` answers with its code and
message. A call made without one tells such a tool that its caller cannot answer."""


@dataclass(frozen=True)
class Followers:
    """What a caller follows of its running call besides the result: progress, log lines, questions."""

    on_progress: ProgressCallback | None = None
    on_log: LogCallback | None = None
    on_input: InputHandler | None = None


@dataclass(frozen=True)
class _Options:
    """How a request travels: the headers a producer may set besides its id."""

    priority: int | None
    deadline: datetime | int | None
    session: str | None
    api_key: str | SecretStr | None


class ToolbusUnavailable(ConnectionError):
    """No toolbus mesh answers on this NATS server (the CALLS stream does not exist)."""


@dataclass(frozen=True)
class CallResult:
    """The final answer to one call: an MCP CallToolResult (`result`) or a JSON-RPC `error`."""

    call_id: str
    status: CallStatus
    response: ToolCallResponse
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        """The MCP CallToolResult (empty when the call ended with an error)."""
        return self.response.result or {}

    @property
    def is_error(self) -> bool:
        """True for a JSON-RPC error or a tool result with `isError: true`."""
        return self.response.error is not None or bool(self.result.get("isError"))

    @property
    def content(self) -> list[dict[str, Any]]:
        return list(self.result.get("content", []))

    @property
    def structured_content(self) -> Any:
        return self.result.get("structuredContent")

    @property
    def text(self) -> str:
        """The text content blocks joined by newlines (the error message for errors)."""
        if self.response.error is not None:
            return self.response.error.message
        return "\n".join(str(block.get("text", "")) for block in self.content if block.get("type") == "text")

    def raise_for_error(self) -> CallResult:
        """Raise `CallFailed` if the call ended with a JSON-RPC error; return self otherwise."""
        error = self.response.error
        if error is not None:
            raise CallFailed(error.code, error.message, error.data.model_dump())
        return self


def parse_result(call_id: str, data: bytes, headers: dict[str, str] | None) -> CallResult:
    """A result message from the bus as a `CallResult`."""
    headers = dict(headers or {})
    response = ToolCallResponse.model_validate_json(data)
    status = CallStatus(headers.get(Header.STATUS, CallStatus.FAILED if response.error else CallStatus.OK))
    return CallResult(call_id=call_id, status=status, response=response, headers=headers)


class ToolbusClient:
    """An async producer of tool calls on one NATS connection; safe for concurrent calls."""

    def __init__(
        self,
        nats_url: str,
        api_key: str | SecretStr,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str = "toolbus-client",
    ) -> None:
        self._url = nats_url
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._subjects = Subjects(prefix)
        self._timeout_s = timeout_s
        self._name = name
        self._nc: NatsClient | None = None
        self._inbox = ""
        self._waiting: dict[str, asyncio.Future[CallResult]] = {}

    async def __aenter__(self) -> ToolbusClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to NATS and subscribe this client's reply inbox."""
        self._nc = await nats.connect(servers_of(self._url), name=self._name, max_reconnect_attempts=-1)
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    @property
    def context(self) -> ContextClient:
        """The context store's API on this client's connection (sessions, render, handoff)."""
        return ContextClient(self._connected(), self._subjects)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        deadline: datetime | int | None = None,
        session: str | None = None,
        call_id: str | None = None,
        timeout_s: float | None = None,
        raise_on_error: bool = True,
        api_key: str | SecretStr | None = None,
        meta: dict[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        on_input: InputHandler | None = None,
    ) -> CallResult:
        """Call a tool and wait for its final result.

        `deadline` is a datetime or epoch milliseconds; past it the call is never executed.
        A JSON-RPC error raises `CallFailed` unless `raise_on_error` is False; a tool's own
        failure is a result with `is_error` set, as in MCP. `api_key` replaces the client's key
        for this call only, so one connection can speak for many callers (the MCP gateway).
        `meta` is the request's MCP `_meta`; `on_progress` receives the `params` of each progress
        notification the tool sends while it runs (`progress`, `total`, `message`, `progressToken`),
        `on_log` each log line it sends (see `LogCallback`), and `on_input` answers the sampling
        and elicitation requests it makes of its caller (see `InputHandler`).
        """
        params = {"name": tool, "arguments": arguments or {}, **({"_meta": meta} if meta else {})}
        options = _Options(priority, deadline, session, api_key)
        followers = Followers(on_progress, on_log, on_input)
        return await self._request("tools/call", params, options, call_id, timeout_s, raise_on_error, followers)

    async def read_resource(
        self, uri: str, *, priority: int | None = None, deadline: datetime | int | None = None,
        call_id: str | None = None, timeout_s: float | None = None, raise_on_error: bool = True,
        api_key: str | SecretStr | None = None,
    ) -> CallResult:
        """Read a backend's resource over the bus (`resources/read`): `result` is an MCP ReadResourceResult."""
        options = _Options(priority, deadline, None, api_key)
        return await self._request("resources/read", {"uri": uri}, options, call_id, timeout_s, raise_on_error)

    async def get_prompt(
        self, name: str, arguments: dict[str, str] | None = None, *, priority: int | None = None,
        deadline: datetime | int | None = None, call_id: str | None = None, timeout_s: float | None = None,
        raise_on_error: bool = True, api_key: str | SecretStr | None = None,
    ) -> CallResult:
        """Get a backend's prompt over the bus (`prompts/get`): `result` is an MCP GetPromptResult."""
        options = _Options(priority, deadline, None, api_key)
        params = {"name": name, "arguments": arguments or {}}
        return await self._request("prompts/get", params, options, call_id, timeout_s, raise_on_error)

    async def submit(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        deadline: datetime | int | None = None,
        session: str | None = None,
        call_id: str | None = None,
        reply: bool = False,
        api_key: str | SecretStr | None = None,
    ) -> str:
        """Publish a call without waiting for its result; returns the call id once durably accepted.

        `api_key`, when given, is sent instead of the client's own key (for this call only).
        """
        params = {"name": tool, "arguments": arguments or {}}
        return await self._publish("tools/call", params, _Options(priority, deadline, session, api_key),
                                   call_id or new_call_id(), reply)

    async def _request(  # noqa: PLR0917  # the public methods' options, passed on as they came
        self, method: str, params: dict[str, Any], options: _Options, call_id: str | None, timeout_s: float | None,
        raise_on_error: bool, followers: Followers | None = None,
    ) -> CallResult:
        """Publish one request and wait for its final result (following it, if asked, while waiting)."""
        call_id = call_id or new_call_id()
        future = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        following = await self._follow(call_id, followers) if followers else []
        try:
            with tracer.start_as_current_span("toolbus.call", attributes={"toolbus.call_id": call_id}):
                await self._publish(method, params, options, call_id, reply=True)
            result = await self._await_result(call_id, future, timeout_s or self._timeout_s)
        finally:
            self._waiting.pop(call_id, None)
            for subscription in following:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        return result.raise_for_error() if raise_on_error else result

    async def _follow(self, call_id: str, followers: Followers) -> list[Subscription]:
        """Subscribe to the call's progress, log and input subjects (those asked for) before the call
        is published, so nothing it sends is missed."""
        nc, subjects = self._connected(), self._subjects
        wanted = [(subjects.progress(call_id), followers.on_progress and _notifications_to(followers.on_progress)),
                  (subjects.log(call_id), followers.on_log and _notifications_to(followers.on_log)),
                  (subjects.input(call_id), followers.on_input and _answers_from(followers.on_input))]
        return [await nc.subscribe(subject, cb=handler) for subject, handler in wanted if handler]

    async def _publish(
        self, method: str, params: dict[str, Any], options: _Options, call_id: str, reply: bool
    ) -> str:
        body = {"jsonrpc": "2.0", "id": call_id, "method": method, "params": params}
        headers = self._headers(call_id, options.priority, options.deadline, options.session, reply)
        if options.api_key is not None:
            key = options.api_key.get_secret_value() if isinstance(options.api_key, SecretStr) else options.api_key
            headers[Header.AUTHORIZATION] = f"Bearer {key}"
        try:
            await self._connected().jetstream().publish(self._subjects.call, dump_json(body), headers=headers)
        except NoStreamResponseError:
            raise ToolbusUnavailable(f"no CALLS stream answers for {self._subjects.call!r}: is toolbus up?") from None
        return call_id

    def _headers(
        self, call_id: str, priority: int | None, deadline: datetime | int | None, session: str | None, reply: bool
    ) -> dict[str, str]:
        headers = {
            Header.MSG_ID: call_id,
            Header.AUTHORIZATION: f"Bearer {self._api_key.get_secret_value()}",
            Header.CONTENT_TYPE: CONTENT_JSON,
            **trace_headers(),
        }
        if reply:
            headers[Header.REPLY_TO] = f"{self._inbox}.{call_id}"
        if priority is not None:
            headers[Header.PRIORITY] = str(priority)
        if deadline is not None:
            epoch_ms = int(deadline.timestamp() * 1000) if isinstance(deadline, datetime) else int(deadline)
            headers[Header.DEADLINE] = str(epoch_ms)
        if session:
            headers[Header.SESSION] = session
        return headers

    async def cancel(self, call_id: str) -> None:
        """Ask the mesh to cancel a call: a running call is stopped, a waiting one never runs.

        The call still ends with one final result, `cancelled` (-32800), unless it finished first.
        """
        nc = self._connected()
        await nc.publish(self._subjects.cancel(call_id), b"")
        await nc.flush()

    async def fetch_result(self, call_id: str) -> CallResult | None:
        """The stored result of a call (e.g. after a reconnect), or None if it has none yet."""
        try:
            stored = await self._connected().jetstream().get_last_msg(
                Stream.RESULTS.value, self._subjects.result(call_id), direct=True
            )
        except NotFoundError:
            return None
        return parse_result(call_id, stored.data or b"", stored.headers)

    async def wait_result(self, call_id: str, timeout_s: float | None = None) -> CallResult:
        """Wait for the stored result of a call submitted earlier (polls RESULTS, bounded).

        A poll that fails because the bus is briefly away (a nats-server restart, JetStream
        not yet back) counts as "no result yet": only the overall timeout ends the wait.
        """
        async with asyncio.timeout(timeout_s or self._timeout_s):
            delay = 0.01
            while True:
                with contextlib.suppress(*_BUS_AWAY):
                    if (result := await self.fetch_result(call_id)) is not None:
                        return result
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _await_result(self, call_id: str, future: asyncio.Future[CallResult], timeout_s: float) -> CallResult:
        """The reply, or, if it never came (reconnect, lost reply), the stored result."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        stored = await self.fetch_result(call_id)
        if stored is None:
            raise TimeoutError(f"no result for call {call_id} within {timeout_s}s")
        return stored

    async def _on_reply(self, msg: Msg) -> None:
        call_id = msg.subject.rsplit(".", 1)[-1]
        future = self._waiting.get(call_id)
        if future is None or future.done():
            return  # a duplicate or a reply for a call we stopped waiting for
        try:
            future.set_result(parse_result(call_id, msg.data, msg.headers))
        except (ValueError, json.JSONDecodeError) as error:
            future.set_exception(error)

    def _connected(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("ToolbusClient is not connected: use 'async with ToolbusClient(...)'")
        return self._nc


def _notifications_to(callback: ProgressCallback | LogCallback) -> Callable[[Msg], Awaitable[None]]:
    """A subscription handler giving each JSON-RPC notification's `params` to `callback`."""

    async def deliver(msg: Msg) -> None:
        with contextlib.suppress(ValueError, AttributeError, KeyError):  # a malformed notification is skipped
            await callback(json.loads(msg.data)["params"])

    return deliver


def _answers_from(handler: InputHandler) -> Callable[[Msg], Awaitable[None]]:
    """A subscription handler answering each input request of a running call with `handler`."""

    async def answer(msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
            reply: dict[str, Any] = {"result": await handler(str(request["method"]), dict(request.get("params") or {}))}
        except CallFailed as refused:
            reply = {"error": {"code": refused.code, "message": refused.message}}
        except Exception as error:  # noqa: BLE001  # the tool must get an answer, not wait out its deadline
            log.warning("client.input_handler_failed", error=repr(error))
            reply = {"error": {"code": INTERNAL_ERROR, "message": "the caller failed to answer"}}
        await msg.respond(dump_json(reply))

    return answer

"""The fixtures the MCP conformance suite's `tools-*`, `resources-*` and `prompts-*` scenarios call.

Names, URIs and payloads are the ones the suite's scenario descriptions specify
(`@modelcontextprotocol/conformance`, pinned in scripts/conformance/setup.sh); the suite checks
shapes more loosely than it specifies them, so matching the specification exactly keeps the
fixture honest when the checks tighten.

Sampling and elicitation go through the SDK's resolvers (`Resolve`/`Sample`/`Elicit`) rather
than `ctx.session` calls: one definition then serves both wires, as a mid-call server-to-client
request on the 2025-11-25 handshake wire and as an `InputRequiredResult` round trip on 2026-07-28.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import wave
import zlib
from typing import Annotated, Any, get_args

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, Elicit, ElicitationResult, MCPServer, Resolve, Sample, UserMessage
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import (
    AudioContent,
    CallToolResult,
    CreateMessageResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    LoggingLevel,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field

app = MCPServer(
    "toolbus-conformance-backend",
    instructions="Fixture server for the MCP conformance suite's tools-, resources- and prompts- scenarios.",
    log_level="WARNING",
)

WATCHED_URI = "test://watched-resource"
# Severity order of MCP log levels (RFC 5424 names), lowest first: the order the SDK's type lists them in.
LOG_LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)


def png_1x1_red() -> bytes:
    """A valid 1x1 red PNG, built rather than pasted so its CRCs are right by construction."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte 0, then one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def wav_silence() -> bytes:
    """A valid, tiny WAV file (10 ms of 8 kHz mono silence); the suite wants `audio/wav`."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(8000)
        sink.writeframes(b"\x00\x00" * 80)
    return buffer.getvalue()


PNG = png_1x1_red()
PNG_BASE64 = base64.b64encode(PNG).decode()
WAV_BASE64 = base64.b64encode(wav_silence()).decode()


class ServerState:
    """What the handshake-era methods remember between requests: the log threshold, subscriptions.

    Process-wide rather than per session: the suite runs one scenario at a time, and behind a
    gateway the backend cannot tell the gateway's callers apart anyway.
    """

    def __init__(self) -> None:
        self.log_threshold: LoggingLevel = "debug"  # send everything until a client asks for less
        self.subscriptions: set[str] = set()

    def should_log(self, level: LoggingLevel) -> bool:
        """Whether a message at `level` passes the threshold `logging/setLevel` last set."""
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(self.log_threshold)


state = ServerState()


def text_result(text: str) -> CallToolResult:
    """A plain text tool result, without the structured copy a `str` return would add."""
    return CallToolResult(content=[TextContent(type="text", text=text)])


# Tools


@app.tool(description="Returns a simple text response.")
def test_simple_text() -> CallToolResult:
    return text_result("This is a simple text response for testing.")


@app.tool(description="Returns a 1x1 red PNG as image content.")
def test_image_content() -> CallToolResult:
    return CallToolResult(content=[ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")])


@app.tool(description="Returns a short WAV file as audio content.")
def test_audio_content() -> CallToolResult:
    return CallToolResult(content=[AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")])


@app.tool(description="Returns an embedded text resource.")
def test_embedded_resource() -> CallToolResult:
    resource = TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
    )
    return CallToolResult(content=[EmbeddedResource(type="resource", resource=resource)])


@app.tool(description="Returns text, image and embedded resource content in one result.")
def test_multiple_content_types() -> CallToolResult:
    resource = TextResourceContents(
        uri="test://mixed-content-resource",
        mime_type="application/json",
        text=json.dumps({"test": "data", "value": 123}, separators=(",", ":")),
    )
    return CallToolResult(
        content=[
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=resource),
        ]
    )


@app.tool(description="Sends three info log notifications, 50 ms apart, while it runs.")
async def test_tool_with_logging(ctx: Context) -> CallToolResult:
    for step, message in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
        if step:
            await asyncio.sleep(0.05)  # the suite wants notifications spread over the call, not a burst
        if state.should_log("info"):
            await ctx.info(message)
    return text_result("Tool with logging executed successfully")


@app.tool(description="Reports progress 0/100, 50/100 and 100/100, 50 ms apart.")
async def test_tool_with_progress(ctx: Context) -> CallToolResult:
    for step, progress in enumerate((0, 50, 100)):
        if step:
            await asyncio.sleep(0.05)
        # A no-op when the request carried no progressToken, as the scenario allows.
        await ctx.report_progress(progress, 100, f"Completed step {progress} of 100")
    return text_result("Tool with progress executed successfully")


@app.tool(description="Always fails, as a tool error (isError: true).")
def test_error_handling() -> CallToolResult:
    raise ToolError("This tool intentionally returns an error for testing")


def ask_model(prompt: str) -> Sample:
    """The sampling request test_sampling needs: the caller's prompt as one user message."""
    message = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
    return Sample([message], max_tokens=100)


@app.tool(description="Asks the client's LLM (sampling/createMessage) to answer `prompt`.")
def test_sampling(
    prompt: Annotated[str, Field(description="The prompt to send to the LLM")],
    reply: Annotated[CreateMessageResult, Resolve(ask_model)],
) -> CallToolResult:
    del prompt  # consumed by ask_model; declared here so it is the tool's argument
    answer = reply.content.text if isinstance(reply.content, TextContent) else "No response"
    return text_result(f"LLM response: {answer}")


class UserDetails(BaseModel):
    """The form test_elicitation asks the user to fill in."""

    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


def ask_user(message: str) -> Elicit[UserDetails]:
    """The elicitation request test_elicitation needs: the caller's message and the details form."""
    return Elicit(message, UserDetails)


@app.tool(description="Asks the user (elicitation/create) for a username and email.")
def test_elicitation(
    message: Annotated[str, Field(description="The message to show the user")],
    answer: Annotated[ElicitationResult[UserDetails], Resolve(ask_user)],
) -> CallToolResult:
    del message  # consumed by ask_user
    content: dict[str, Any] = answer.data.model_dump() if answer.action == "accept" else {}
    return text_result(f"User response: action={answer.action}, content={json.dumps(content)}")


# Resources


@app.resource("test://static-text", name="static-text", description="A static text resource.", mime_type="text/plain")
def static_text() -> str:
    return "This is the content of the static text resource."


@app.resource(
    "test://static-binary", name="static-binary", description="A static binary resource (PNG).", mime_type="image/png"
)
def static_binary() -> bytes:
    return PNG


@app.resource(
    "test://template/{id}/data",
    name="template-data",
    description="A resource template that substitutes {id}.",
    mime_type="application/json",
)
def template_data(id: str) -> str:
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"}, separators=(",", ":"))


@app.resource(WATCHED_URI, name="watched-resource", description="A resource to subscribe to.", mime_type="text/plain")
def watched_resource() -> str:
    return "Watched resource content"


# Prompts


@app.prompt(description="A simple prompt without arguments.")
def test_simple_prompt() -> list[UserMessage]:
    return [UserMessage(TextContent(type="text", text="This is a simple prompt for testing."))]


@app.prompt(description="A prompt with two required arguments.")
def test_prompt_with_arguments(
    arg1: Annotated[str, Field(description="First test argument")],
    arg2: Annotated[str, Field(description="Second test argument")],
) -> list[UserMessage]:
    return [UserMessage(TextContent(type="text", text=f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]


@app.prompt(description="A prompt that embeds the resource named by `resourceUri`.")
def test_prompt_with_embedded_resource(
    resourceUri: Annotated[str, Field(description="URI of the resource to embed")],  # the suite's argument name
) -> list[UserMessage]:
    resource = TextResourceContents(
        uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
    )
    return [
        UserMessage(EmbeddedResource(type="resource", resource=resource)),
        UserMessage(TextContent(type="text", text="Please process the embedded resource above.")),
    ]


@app.prompt(description="A prompt with image content.")
def test_prompt_with_image() -> list[UserMessage]:
    return [
        UserMessage(ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
        UserMessage(TextContent(type="text", text="Please analyze the image above.")),
    ]


# Handshake-era methods MCPServer has no decorator for. They exist only on the 2025-11-25 wire
# (2026-07-28 replaced them with per-request log levels and subscriptions/listen), so they are
# registered on the low-level server directly.


async def set_log_level(ctx: ServerRequestContext[Any], params: SetLevelRequestParams) -> EmptyResult:
    state.log_threshold = params.level
    return EmptyResult()


async def subscribe(ctx: ServerRequestContext[Any], params: SubscribeRequestParams) -> EmptyResult:
    state.subscriptions.add(str(params.uri))
    return EmptyResult()


async def unsubscribe(ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams) -> EmptyResult:
    state.subscriptions.discard(str(params.uri))
    return EmptyResult()


app._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_log_level)
app._lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
app._lowlevel_server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)

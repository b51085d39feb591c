"""The demo MCP server's tools, built on the SDK's `MCPServer` (formerly FastMCP).

Every tool is deterministic except `flaky`, which is random by design, and `crash` and
`fragile`, which kill the server process so the executor's restart, retry and breaker paths can
be exercised.

Execution record: when `TOOLBUS_DEMO_RECORD` names a file, every run of a tool appends one JSON
line `{"tool", "call_id", "pid", "ts"}` to it (call_id from the request's `_meta`, where the
executor puts it), so tests can count how often a tool really ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent

app = MCPServer(
    "toolbus-demo",
    instructions="Demo tools for toolbus: echo, sleep_ms, fail, flaky, summarize, progress, note, pid, crash; "
    "a review prompt and demo:// resources.",
    log_level="WARNING",
)


RECORD_ENV = "TOOLBUS_DEMO_RECORD"
BROKEN_ENV = "TOOLBUS_DEMO_BROKEN_FILE"
CALL_ID_META = "io.toolbus/call_id"
MAX_TOKENS_META = "io.toolbus/max_tokens"  # the tokens the caller's budget hold pays for
NOTES_URI = "demo://notes"
NOTES: list[str] = []  # what `note` appended, served as the `demo://notes` resource


def record(tool: str, ctx: Context | None) -> None:
    """Append this run to the execution record, if one is configured."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    meta: Any = ctx.request_context.meta if ctx is not None else None
    call_id = meta.get(CALL_ID_META) if isinstance(meta, dict) else None
    line = json.dumps({"tool": tool, "call_id": call_id, "pid": os.getpid(), "ts": time.time()})
    with open(path, "a", encoding="utf-8") as sink:  # O_APPEND: whole lines, even from several processes
        sink.write(line + "\n")


@app.tool()
def echo(text: str, ctx: Context | None = None) -> str:
    """Return `text` unchanged."""
    record("echo", ctx)
    return text


@app.tool()
async def sleep_ms(ms: int, ctx: Context | None = None) -> str:
    """Sleep for `ms` milliseconds (0..600000), then say how long it slept."""
    if not 0 <= ms <= 600_000:
        raise ToolError("ms must be between 0 and 600000")
    record("sleep_ms", ctx)
    await asyncio.sleep(ms / 1000)
    record("sleep_ms.finished", ctx)  # absent from the record when the call was cancelled mid-sleep
    return f"slept {ms} ms"


@app.tool()
def fragile(ctx: Context | None = None) -> str:
    """Crash the server while the file named by TOOLBUS_DEMO_BROKEN_FILE exists; else answer ok."""
    record("fragile", ctx)
    broken = os.environ.get(BROKEN_ENV)
    if broken and os.path.exists(broken):
        os._exit(18)
    return "ok"


@app.tool()
def fail(message: str = "failed on purpose", ctx: Context | None = None) -> str:
    """Always fail with `message`, as a tool error (`isError: true`)."""
    record("fail", ctx)
    raise ToolError(message)


@app.tool()
def flaky(rate: float = 0.5) -> str:
    """Fail as a tool error with probability `rate` (0..1), else succeed."""
    if not 0 <= rate <= 1:
        raise ToolError("rate must be between 0 and 1")
    if random.random() < rate:
        raise ToolError(f"flaky failure (rate {rate})")
    return "ok"


@app.tool()
def summarize(text: str, max_words: int = 12, ctx: Context | None = None) -> CallToolResult:
    """Summarize `text` as its first `max_words` words (one token per word); token usage is reported
    in `_meta.usage`. Output stops at the `io.toolbus/max_tokens` the caller's budget allows."""
    meta: Any = ctx.request_context.meta if ctx is not None else None
    allowed = meta.get(MAX_TOKENS_META) if isinstance(meta, dict) else None
    if isinstance(allowed, int) and allowed >= 0:
        max_words = min(max_words, allowed)
    words = text.split()
    summary = " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")
    usage = {"model": "demo-extractive-1", "input_tokens": len(words), "output_tokens": min(len(words), max_words)}
    return CallToolResult(content=[TextContent(type="text", text=summary)], _meta={"usage": usage})


@app.tool()
async def progress(steps: int = 3, delay_ms: int = 50, ctx: Context | None = None) -> str:
    """Report `steps` progress notifications, `delay_ms` apart, then finish."""
    for step in range(1, max(1, min(steps, 100)) + 1):
        if ctx is not None:
            await ctx.report_progress(step, steps, f"step {step} of {steps}")
        await asyncio.sleep(delay_ms / 1000)
    return f"done after {steps} steps"


@app.tool()
async def note(text: str, ctx: Context | None = None) -> str:
    """Append `text` to the `demo://notes` resource, which tells its subscribers it changed."""
    record("note", ctx)
    NOTES.append(text)
    if ctx is not None:
        await ctx.notify_resource_updated(NOTES_URI)
    return f"{len(NOTES)} notes"


@app.tool()
def pid() -> int:
    """The server process id (tests use it to kill the backend)."""
    return os.getpid()


@app.tool()
def crash(ctx: Context | None = None) -> str:
    """Kill this server process at once, as a backend crash would."""
    record("crash", ctx)
    os._exit(17)


# --- prompts and resources (the gateway proxies them over the bus, like tools) ----------------


@app.prompt(title="Code review")
def review(code: str, language: str = "python") -> str:
    """Ask for a careful review of `code`."""
    return f"Please review this {language} code for bugs and unclear names:\n\n{code}"


@app.resource("demo://readme", title="About the demo server", mime_type="text/markdown")
def readme() -> str:
    """What the demo server is for."""
    return "# toolbus demo\n\nTools, a prompt and resources for trying toolbus end to end.\n"


@app.resource(NOTES_URI, title="Notes left with the note tool", mime_type="text/plain")
def notes() -> str:
    """Every note left with the `note` tool, one a line: a resource that changes, for subscriptions.
    Each server process keeps its own notes (a pool's workers each run one)."""
    return "\n".join(NOTES)


@app.resource("demo://echo/{text}", mime_type="text/plain")
def echo_resource(text: str) -> str:
    """A resource per URI: its text is the last path segment."""
    return text

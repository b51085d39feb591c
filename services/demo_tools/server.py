"""The demo MCP server's tools, built on the SDK's `MCPServer` (formerly FastMCP).

Every tool is deterministic except `flaky`, which is random by design, and `crash`, which
kills the server process so the executor's restart and retry paths can be exercised.
"""

from __future__ import annotations

import asyncio
import os
import random

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent

app = MCPServer(
    "toolbus-demo",
    instructions="Demo tools for toolbus: echo, sleep_ms, fail, flaky, summarize, progress, pid, crash.",
    log_level="WARNING",
)


@app.tool()
def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text


@app.tool()
async def sleep_ms(ms: int) -> str:
    """Sleep for `ms` milliseconds (0..600000), then say how long it slept."""
    if not 0 <= ms <= 600_000:
        raise ToolError("ms must be between 0 and 600000")
    await asyncio.sleep(ms / 1000)
    return f"slept {ms} ms"


@app.tool()
def fail(message: str = "failed on purpose") -> str:
    """Always fail with `message`, as a tool error (`isError: true`)."""
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
def summarize(text: str, max_words: int = 12) -> CallToolResult:
    """Summarize `text` as its first `max_words` words; token usage is reported in `_meta.usage`."""
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
def pid() -> int:
    """The server process id (tests use it to kill the backend)."""
    return os.getpid()


@app.tool()
def crash() -> str:
    """Kill this server process at once, as a backend crash would."""
    os._exit(17)

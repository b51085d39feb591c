"""`toolbus ctx …` against a live `toolbus up`: a session is created, filled (TEXT, stdin, --file), shown,
rendered into a budget, exported, imported by another agent, searched and forgotten, all through the CLI.

One mesh for the module, with only the context store and the router (no audit, no accounting, no tool
servers). `conversation` builds the planner's session once and `handoff` imports it as the reviewer's;
every other test works on sessions of its own agent or user, so no test changes what another reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.context.tokens import count_tokens
from shared.mesh import free_port
from tests.helpers import TOOLBUS, toolbus_up

pytestmark = [pytest.mark.e2e]

PREFIX = f"ctxcli{uuid.uuid4().hex[:8]}"
WIDE = {"COLUMNS": "200"}  # rich wraps tables at 80 columns when output is no terminal
USER = f"user-{PREFIX}"
SYSTEM_PROMPT = "You are the release planner. Answer in one short paragraph."
QUESTION = "When is the next release?"
ANSWER_ON_STDIN = "The next release ships on Friday,\nafter the freeze.\n"
KNOWLEDGE = " ".join(f"Release note {n}: the scheduler moved job {n} to the night queue." for n in range(40))
BUDGET = 120  # room for the system prompt and both turns, not for the long KNOWLEDGE block


@dataclass(frozen=True)
class Mesh:
    """The running mesh's data directory: where the CLI finds runtime.json."""

    data_dir: Path

    def ctx(self, *args: str, stdin: str = "", env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """`toolbus ctx ARGS` as a subprocess, with `stdin` as its standard input."""
        return subprocess.run([*TOOLBUS, "ctx", *args, "--data-dir", str(self.data_dir)], input=stdin,
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, **WIDE, **(env or {})})

    def ok(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """`toolbus ctx ARGS`, which must exit 0."""
        done = self.ctx(*args, stdin=stdin)
        assert done.returncode == 0, f"ctx {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str, stdin: str = "") -> Any:
        """The JSON that `toolbus ctx ARGS --json` prints."""
        return json.loads(self.ok(*args, "--json", stdin=stdin).stdout)

    def new_session(self, agent: str, *args: str) -> str:
        """The id `toolbus ctx create AGENT ARGS` prints."""
        return self.ok("create", agent, *args).stdout.strip()


@dataclass(frozen=True)
class Conversation:
    """The planner's session and how it was built."""

    session_id: str
    created: subprocess.CompletedProcess[str]
    appended: list[subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Handoff:
    """The planner's session exported to a file and imported as the reviewer's."""

    package_file: Path
    imported_id: str


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """`toolbus up` with the context store on and nothing it does not need."""
    config = {"prefix": PREFIX, "audit": {"enabled": False}, "accounting": {"enabled": False}}
    with toolbus_up(tmp_path_factory.mktemp("ctx"), config) as (data_dir, _runtime):
        yield Mesh(data_dir)


@pytest.fixture(scope="module")
def conversation(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Conversation:
    """`create planner --system …`, then a USER turn as TEXT, an AGENT turn on stdin and KNOWLEDGE from --file."""
    created = mesh.ok("create", "planner", "--user", USER, "--meta", "team=release", "--meta", "ticket=REL-7",
                      "--system", SYSTEM_PROMPT)
    session_id = created.stdout.strip()
    notes = tmp_path_factory.mktemp("notes") / "notes.txt"
    notes.write_text(KNOWLEDGE)
    appended = [
        mesh.ok("append", session_id, "--type", "USER", QUESTION),
        mesh.ok("append", session_id, "--type", "AGENT", "-", stdin=ANSWER_ON_STDIN),
        mesh.ok("append", session_id, "--type", "KNOWLEDGE", "--file", str(notes), "--relevance", "0.9",
                "--meta", "source=wiki", "--id", "notes-1"),
    ]
    return Conversation(session_id, created, appended)


@pytest.fixture(scope="module")
def handoff(mesh: Mesh, conversation: Conversation, tmp_path_factory: pytest.TempPathFactory) -> Handoff:
    """`export --out FILE` of the planner's session, then `import FILE --agent reviewer`."""
    package_file = tmp_path_factory.mktemp("export") / "planner.json"
    mesh.ok("export", conversation.session_id, "--out", str(package_file))
    imported_id = mesh.ok("import", str(package_file), "--agent", "reviewer").stdout.strip()
    return Handoff(package_file, imported_id)


def test_create_prints_the_id_and_append_stores_text_stdin_and_file(mesh: Mesh, conversation: Conversation) -> None:
    """`create` prints only the session id on stdout, and the session holds the blocks appended from TEXT, stdin
    and --file, in order and exactly as given."""
    assert conversation.created.stdout == f"{conversation.session_id}\n"
    assert conversation.created.stderr.endswith("of agent planner at version 1\n"), conversation.created.stderr
    session = mesh.json("get", conversation.session_id)
    assert (session["session_id"], session["agent_id"], session["user_id"]) == (conversation.session_id, "planner",
                                                                                 USER)
    assert session["metadata"] == {"team": "release", "ticket": "REL-7"}
    blocks = [(b["type"], b["content"]) for b in session["blocks"]]
    assert blocks == [("SYSTEM", SYSTEM_PROMPT), ("USER", QUESTION), ("AGENT", ANSWER_ON_STDIN),
                      ("KNOWLEDGE", KNOWLEDGE)]
    notes = session["blocks"][3]
    assert (notes["id"], notes["relevance"], notes["metadata"]) == ("notes-1", 0.9, {"source": "wiki"})
    assert session["version"] == 4 and session["metrics"]["blocks"] == 4
    assert f"appended notes-1 to {conversation.session_id}: version 4, 4 blocks" in conversation.appended[2].stdout


def test_get_prints_a_table_of_blocks_and_the_metrics(mesh: Mesh, conversation: Conversation) -> None:
    """`get` prints the owner, the token total and one row per block with its type, tokens and content preview."""
    session = mesh.json("get", conversation.session_id)
    shown = mesh.ok("get", conversation.session_id).stdout
    assert f"of agent planner, user {USER}, version 4" in shown, shown
    assert f"4 blocks, {session['metrics']['total_tokens']} tokens" in shown and "of 32000" in shown, shown
    rows = {line.split()[0]: line for line in shown.splitlines() if line.split() and line.split()[0] in
            {b["id"] for b in session["blocks"]}}
    assert len(rows) == 4, shown
    notes = rows["notes-1"]
    assert "KNOWLEDGE" in notes and str(session["blocks"][3]["token_count"]) in notes and "0.900" in notes, notes
    assert KNOWLEDGE[:40] in notes and KNOWLEDGE[:80] not in notes, notes  # a preview, not the whole block


def test_render_fits_the_budget_and_keeps_the_system_prompt(mesh: Mesh, conversation: Conversation) -> None:
    """`render --budget N` prints the system prompt and the latest turns within N tokens (counted here), leaves
    out what does not fit, and says so on stderr."""
    done = mesh.ok("render", conversation.session_id, "--budget", str(BUDGET))
    text = done.stdout
    assert SYSTEM_PROMPT in text and QUESTION in text and ANSWER_ON_STDIN in text, text
    assert "Release note" not in text, text
    tokens = count_tokens(text)
    assert tokens <= BUDGET
    assert done.stderr == f"{tokens} tokens of budget {BUDGET}, 1 blocks left out\n"
    reply = mesh.json("render", conversation.session_id, "--budget", str(BUDGET))
    assert (reply["text"], reply["tokens"], reply["omitted"]) == (text, tokens, ["notes-1"])


def test_an_imported_session_renders_byte_identical(mesh: Mesh, conversation: Conversation,
                                                    handoff: Handoff) -> None:
    """A session exported to a file and imported by another agent renders to the same bytes as the original."""
    package = json.loads(handoff.package_file.read_text())
    assert package["format"] == "toolbus.ctx/1" and package["session"]["session_id"] == conversation.session_id
    assert handoff.imported_id != conversation.session_id
    imported = mesh.json("get", handoff.imported_id)
    assert imported["agent_id"] == "reviewer" and len(imported["blocks"]) == 4
    original = mesh.ok("render", conversation.session_id, "--budget", "2000").stdout
    assert SYSTEM_PROMPT in original and KNOWLEDGE in original, original
    assert mesh.ok("render", handoff.imported_id, "--budget", "2000").stdout == original


def test_export_to_stdout_imports_from_stdin(mesh: Mesh, conversation: Conversation) -> None:
    """`export SESSION | import - --agent A` gives A a session with the same blocks, ids and token counts."""
    package = mesh.ok("export", conversation.session_id).stdout
    imported = mesh.json("import", "-", "--agent", "archivist", stdin=package)
    assert imported["agent_id"] == "archivist"
    assert imported["blocks"] == json.loads(package)["session"]["blocks"]


def test_search_finds_sessions_by_agent_user_and_metadata(mesh: Mesh, conversation: Conversation,
                                                          handoff: Handoff) -> None:
    """`search` filters by agent, by user and by metadata (an import keeps the user and the metadata)."""

    def found(*criteria: str) -> set[str]:
        return {summary["session_id"] for summary in mesh.json("search", *criteria)}

    assert found("--agent", "planner") == {conversation.session_id}
    assert found("--meta", "ticket=REL-7", "--agent", "reviewer") == {handoff.imported_id}
    assert found("--user", USER, "--meta", "team=payments") == set()
    table = mesh.ok("search", "--user", USER).stdout  # the user's sessions, as a table
    rows = [line for line in table.splitlines() if "team=release ticket=REL-7" in line]
    assert {line.split()[0] for line in rows} >= {conversation.session_id, handoff.imported_id}, table


def test_a_stale_if_version_exits_1_naming_the_current_version(mesh: Mesh) -> None:
    """`append --if-version` with a stale version exits 1 with `version_conflict` and the current version, and
    appends nothing."""
    session_id = mesh.new_session("conflicted", "--system", "Be brief.")
    mesh.ok("append", session_id, "--type", "USER", "first", "--if-version", "1")
    stale = mesh.ctx("append", session_id, "--type", "USER", "second", "--if-version", "1")
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert stale.stderr.startswith("error: ") and "(version_conflict)" in stale.stderr, stale.stderr
    assert "retry with --if-version 2" in stale.stderr, stale.stderr
    assert [b["content"] for b in mesh.json("get", session_id)["blocks"]] == ["Be brief.", "first"]


def test_an_unknown_session_exits_1_naming_session_not_found(mesh: Mesh) -> None:
    """`get` of a session that never existed exits 1 with `session_not_found` and no traceback."""
    done = mesh.ctx("get", f"nosuch-{PREFIX}")
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and "(session_not_found)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_dedupe_rescore_prune_and_delete(mesh: Mesh) -> None:
    """`dedupe` removes a repeated block, `rescore` ranks blocks by a query, `prune --target 0` keeps only SYSTEM
    blocks, and after `delete` the session is gone."""
    session_id = mesh.new_session("curator", "--system", "Keep notes.")
    for block_id, content in (("redis", "redis keeps the counters"), ("nats", "nats carries the calls"),
                              ("copy", "nats  carries the\ncalls")):
        mesh.ok("append", session_id, "--type", "MEMORY", content, "--id", block_id)
    assert mesh.json("dedupe", session_id)["removed"] == ["copy"]
    assert "nats" in mesh.json("rescore", session_id, "nats calls", "--method", "tfidf")["changed"]
    relevance = {b["id"]: b["relevance"] for b in mesh.json("get", session_id)["blocks"]}
    assert relevance["nats"] > relevance["redis"], relevance
    pruned = mesh.json("prune", session_id, "--target", "0")
    assert sorted(pruned["removed"]) == ["nats", "redis"] and pruned["metrics"]["type_distribution"] == {"SYSTEM": 1}
    assert mesh.ok("delete", session_id).stdout == f"deleted {session_id}\n"
    assert mesh.ctx("get", session_id).returncode == 1


def test_forget_user_deletes_every_session_of_the_user(mesh: Mesh) -> None:
    """`forget-user` asks first (no answer deletes nothing); with --yes it deletes and prints every session of
    the user, and search then finds none, while other users' sessions stay."""
    gone, kept = f"gone-{PREFIX}", f"kept-{PREFIX}"
    doomed = {mesh.new_session("assistant", "--user", gone), mesh.new_session("helper", "--user", gone)}
    survivor = mesh.new_session("assistant", "--user", kept)
    declined = mesh.ctx("forget-user", gone, stdin="n\n")
    assert declined.returncode == 1 and "delete every context session of user" in declined.stdout, declined.stdout
    forgotten = mesh.ok("forget-user", gone, "--yes")  # prints both: declining deleted neither
    assert set(forgotten.stdout.split()) == doomed and "2 sessions deleted" in forgotten.stderr
    assert mesh.json("search", "--user", gone) == []
    assert [s["session_id"] for s in mesh.json("search", "--user", kept)] == [survivor]


def test_bad_arguments_are_usage_errors(mesh: Mesh) -> None:
    """A `--meta` without `=`, or content given both as TEXT and --file, is a usage error (exit 2)."""
    bad_meta = mesh.ctx("create", "planner", "--meta", "team")
    assert bad_meta.returncode == 2 and "expected key=value, got 'team'" in bad_meta.stderr, bad_meta.stderr
    two_sources = mesh.ctx("append", "any", "--type", "USER", "hi", "--file", str(mesh.data_dir / "runtime.json"))
    assert two_sources.returncode == 2 and "exactly one" in two_sources.stderr, two_sources.stderr


def test_without_a_mesh_commands_exit_2(mesh: Mesh) -> None:
    """A dead NATS URL, or a bus with no context store on the prefix, exits 2 with a hint to start the mesh."""
    dead = mesh.ctx("search", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert dead.returncode == 2 and "cannot reach NATS" in dead.stderr, dead.stdout + dead.stderr
    assert "toolbus up" in dead.stderr and "Traceback" not in dead.stderr
    no_store = mesh.ctx("get", "any", env={"TOOLBUS_PREFIX": f"{PREFIX}-none"})
    assert no_store.returncode == 2 and "no context store answered" in no_store.stderr, no_store.stderr
    assert "toolbus up" in no_store.stderr and "Traceback" not in no_store.stderr

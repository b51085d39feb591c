"""Unit tests for contracts/: the generated JSON Schemas and AsyncAPI document match the code."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]  # msgpack ships no type hints
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from shared import contracts
from shared.codec import pack
from shared.contracts import generate
from shared.contracts.work import WorkItem
from shared.subjects import Stream, Subjects

pytestmark = pytest.mark.unit

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
REGENERATE = "python -m shared.contracts.generate"


def load(relative: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONTRACTS / relative).read_text(encoding="utf-8"))
    return data


def validator(model: str) -> Draft202012Validator:
    schema = load(f"schemas/{model}.json")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def contract_model_names() -> list[str]:
    exported = {name: getattr(contracts, name) for name in contracts.__all__}
    return sorted(name for name, value in exported.items() if isinstance(value, type) and issubclass(value, BaseModel))


def subject_members() -> dict[str, str]:
    """Every public `Subjects` property or method returning a subject, called with `{param}` placeholders."""
    subjects, found = Subjects(), {}
    for name, member in inspect.getmembers(Subjects):
        if name.startswith("_") or name == "stream_subjects":
            continue
        if isinstance(member, property):
            found[name] = getattr(subjects, name)
        elif inspect.isfunction(member):
            parameters = list(inspect.signature(member).parameters)[1:]
            found[name] = getattr(subjects, name)(*("{" + parameter + "}" for parameter in parameters))
    return found


def nats_match(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (`*` one token, `>` the rest) matches a subject."""
    tokens, target = pattern.split("."), subject.split(".")
    for index, token in enumerate(tokens):
        if token == ">":
            return len(target) > index
        if index >= len(target) or token not in ("*", target[index]):
            return False
    return len(tokens) == len(target)


def channel_addresses() -> set[str]:
    return {channel["address"] for channel in load("asyncapi.json")["channels"].values()}


def sample_request() -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "git__git_status", "arguments": {"repo_path": "."}, "_meta": {"progressToken": 1}},
    }


def test_checked_in_contracts_match_a_fresh_generation() -> None:
    """The checked-in contracts/ directory is exactly what the generator produces from the code now."""
    problems = generate.check(CONTRACTS)
    assert not problems, f"contracts/ is stale; run `{REGENERATE}` and commit the result:\n" + "\n".join(problems)


def test_check_reports_missing_extra_and_changed_files(tmp_path: Path) -> None:
    """`--check` exits 1 naming missing, extra and changed files, and exits 0 right after a write."""
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "schemas" / "Event.json").unlink()
    (tmp_path / "schemas" / "Gone.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "asyncapi.json").write_text("{}\n", encoding="utf-8")
    problems = generate.check(tmp_path)
    assert [line.split("\n")[0] for line in problems] == [
        "differs: asyncapi.json",
        "missing: schemas/Event.json",
        "extra: schemas/Gone.json (no longer generated)",
    ]
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", contract_model_names())
def test_every_contract_model_has_a_schema_file(name: str) -> None:
    """Every pydantic model exported by shared.contracts has a JSON Schema file with its own $id."""
    schema = load(f"schemas/{name}.json")
    assert schema["title"] == name
    assert schema["$id"] == f"https://toolbus.dev/contracts/schemas/{name}.json"


@pytest.mark.parametrize(("member", "subject"), sorted(subject_members().items()))
def test_asyncapi_documents_every_subject(member: str, subject: str) -> None:
    """Every subject `Subjects` builds is a channel address, or a wildcard that covers one."""
    addresses = channel_addresses()
    if "*" in subject.split(".") or ">" in subject.split("."):
        assert any(nats_match(subject, address) for address in addresses), f"Subjects.{member} has no channel"
    else:
        assert subject in addresses, f"Subjects.{member} ({subject}) has no channel in contracts/asyncapi.json"


def test_asyncapi_lists_every_stream_with_its_subjects() -> None:
    """`x-toolbus-streams` names every JetStream stream with the subjects it captures."""
    streams = load("asyncapi.json")["x-toolbus-streams"]
    assert streams == {stream.value: {"subjects": Subjects().stream_subjects(stream)} for stream in Stream}


def test_tool_call_request_schema_accepts_a_call_and_rejects_one_without_method() -> None:
    """A well-formed tools/call body validates against ToolCallRequest.json and one missing `method` does not."""
    schema = validator("ToolCallRequest")
    request = sample_request()
    assert schema.is_valid(request)
    del request["method"]
    assert not schema.is_valid(request)


def test_packed_work_item_validates_against_its_schema() -> None:
    """A WorkItem encoded with shared.codec.pack decodes to a value WorkItem.json accepts."""
    work = WorkItem(
        call_id="01JD6Q3VZ8R4W5X6Y7Z8A9B0C1", request_id="req-1", public_tool="git__git_status", server="git",
        tool="git_status", pool="git", arguments={"repo_path": "."}, meta={"progressToken": 3},
        principal="alice", priority=1, deadline_ms=1_900_000_000_000, accepted_at_ms=1_800_000_000_000,
    )
    decoded = msgpack.unpackb(pack(work), raw=False)
    errors = [error.message for error in validator("WorkItem").iter_errors(decoded)]
    assert errors == []

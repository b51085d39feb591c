"""Generate `contracts/`: a JSON Schema per bus message model and an AsyncAPI 3.0 map of the bus.

Why these files exist: toolbus's wire contract lives in pydantic models (`shared.contracts`) and in
`shared.subjects`, which only Python can import. The generated JSON Schemas and AsyncAPI document
let a program in any language find every subject, header and payload shape, and decode messages
off the bus (MCP JSON-RPC for calls and results; msgpack of the very same JSON-mode dump for
internal messages, so one schema serves both encodings).

They are checked in, and `tests/unit/test_contracts.py` regenerates them in memory and compares:
a model or subject change that is not regenerated fails the tests instead of drifting silently.

    python -m shared.contracts.generate            # rewrite contracts/
    python -m shared.contracts.generate --check    # exit 1 if contracts/ is stale
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, TypeAdapter

from shared import contracts
from shared.contracts.audit import AuditEnvelope
from shared.contracts.budget import ReserveRequest
from shared.contracts.context import AppendBlocks
from shared.contracts.events import CallStatus, Event, EventKind
from shared.contracts.jsonrpc import ToolCallRequest, ToolCallResponse
from shared.contracts.registry import ScaleRequest
from shared.contracts.work import DeadLetter, WorkItem
from shared.subjects import CONTENT_JSON, CONTENT_MSGPACK, DEFAULT_PREFIX, Header, Stream, Subjects

JsonObject = dict[str, Any]
Artefacts = dict[str, str]  # path relative to the output directory (posix) -> file text

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "contracts"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_BASE_URL = "https://toolbus.dev/contracts/schemas/"
SCHEMAS_DIR = "schemas"
ASYNCAPI_FILE = "asyncapi.json"
ASYNCAPI_VERSION = "3.0.0"
FALLBACK_VERSION = "0.1.0"
REGENERATE = "python -m shared.contracts.generate"
DIFF_LINES = 40  # lines of unified diff shown per stale file

HEADER_DESCRIPTIONS: dict[Header, str] = {
    Header.MSG_ID: "Message id; on calls the call id (ULID or UUIDv7), JetStream's dedupe key and the "
    "idempotency key end to end.",
    Header.AUTHORIZATION: "`Bearer <api key>`.",
    Header.REPLY_TO: "Extra subject the final result is also sent to.",
    Header.PRIORITY: "0 critical .. 3 low; default 2.",
    Header.DEADLINE: "Epoch milliseconds after which the call is never executed.",
    Header.SESSION: "Context session id the result is appended to.",
    Header.CALL_ID: "The call id the message belongs to.",
    Header.STATUS: "Final status of the call.",
    Header.CONTENT_TYPE: "Encoding of the body.",
    Header.TRACEPARENT: "W3C trace context, propagated through every hop.",
    Header.TRACESTATE: "W3C trace state, propagated with traceparent.",
}


# --- JSON Schemas -------------------------------------------------------------------------------


def contract_models() -> dict[str, type[BaseModel]]:
    """Every pydantic model `shared.contracts` exports, by name."""
    exported = {name: getattr(contracts, name) for name in contracts.__all__}
    return {name: value for name, value in exported.items() if _is_subclass(value, BaseModel)}


def contract_enums() -> dict[str, type[Enum]]:
    """Every enum `shared.contracts` exports, by name."""
    exported = {name: getattr(contracts, name) for name in contracts.__all__}
    return {name: value for name, value in exported.items() if _is_subclass(value, Enum)}


def _is_subclass(value: object, base: type) -> bool:
    return isinstance(value, type) and issubclass(value, base)


def json_schemas() -> dict[str, JsonObject]:
    """The JSON Schema of every exported model and enum, by name.

    Validation mode, not serialization mode: the schema then states what toolbus accepts, which is
    what a producer in another language must write, and every message toolbus itself emits
    satisfies it too (the models round-trip, and fields with defaults are optional, which is also
    true of the `exclude_none` JSON that MCP payloads travel in).
    """
    models, enums = contract_models(), contract_enums()
    schemas = {name: model.model_json_schema(by_alias=True, mode="validation") for name, model in models.items()}
    schemas |= {name: TypeAdapter(enum).json_schema(mode="validation") for name, enum in enums.items()}
    return {name: _identify(name, schema) for name, schema in schemas.items()}


def _identify(name: str, schema: JsonObject) -> JsonObject:
    return {"$schema": SCHEMA_DIALECT, "$id": f"{SCHEMA_BASE_URL}{name}.json", **schema, "title": name}


def _payload_ref(model: type[BaseModel]) -> JsonObject:
    return {"$ref": f"{SCHEMAS_DIR}/{model.__name__}.json"}


# --- AsyncAPI channels --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelSpec:
    """One subject family: its address, its single message and what a bus client does with it."""

    key: str  # channel id, the `Subjects` member that builds the address
    address: str
    summary: str
    message: str  # message name
    payload: JsonObject
    action: Literal["send", "receive"]
    operation: str  # who publishes and who consumes
    content_type: str | None = None
    headers: JsonObject | None = None
    parameters: dict[str, JsonObject] = field(default_factory=dict)


def _slot(name: str) -> str:
    """An AsyncAPI address parameter, passed to a `Subjects` method in place of a real value."""
    return "{" + name + "}"


def _param(description: str, enum: Sequence[str] | None = None) -> JsonObject:
    return {"description": description} | ({"enum": list(enum)} if enum is not None else {})


def _priorities() -> list[str]:
    bounds = WorkItem.model_json_schema()["properties"]["priority"]
    return [str(level) for level in range(bounds["minimum"], bounds["maximum"] + 1)]


def _header_schema(header: Header, content_type: str | None) -> JsonObject:
    schema: JsonObject = {"type": "string", "description": HEADER_DESCRIPTIONS[header]}
    if header is Header.PRIORITY:
        schema["enum"] = _priorities()
    elif header is Header.STATUS:
        schema["enum"] = [status.value for status in CallStatus]
    elif header is Header.CONTENT_TYPE and content_type is not None:
        schema["const"] = content_type
    return schema


def _headers(names: Sequence[Header], content_type: str | None = None, required: Sequence[Header] = ()) -> JsonObject:
    properties = {header.value: _header_schema(header, content_type) for header in names}
    schema: JsonObject = {"type": "object", "properties": properties}
    return schema | ({"required": [header.value for header in required]} if required else {})


TRACE = (Header.TRACEPARENT, Header.TRACESTATE)


def _call(s: Subjects) -> ChannelSpec:
    names = (Header.MSG_ID, Header.AUTHORIZATION, Header.REPLY_TO, Header.PRIORITY, Header.DEADLINE,
             Header.SESSION, Header.CONTENT_TYPE, *TRACE)
    return ChannelSpec(
        key="call", address=s.call, summary="Durable ingress (stream CALLS): MCP `tools/call` requests.",
        message="ToolCallRequest", payload=_payload_ref(ToolCallRequest), content_type=CONTENT_JSON,
        headers=_headers(names, CONTENT_JSON, required=(Header.MSG_ID,)), action="send",
        operation="A producer publishes a call with a JetStream publish; the PubAck means it is durably "
        "accepted. The router consumes it.",
    )


def _result(s: Subjects) -> ChannelSpec:
    names = (Header.CALL_ID, Header.STATUS, Header.CONTENT_TYPE, *TRACE)
    return ChannelSpec(
        key="result", address=s.result(_slot("call_id")), message="ToolCallResponse",
        summary="Final result of one call (stream RESULTS, one message per subject), also sent to "
        "Toolbus-Reply-To if the call named one.",
        payload=_payload_ref(ToolCallResponse), content_type=CONTENT_JSON, action="receive",
        headers=_headers(names, CONTENT_JSON, required=(Header.CALL_ID, Header.STATUS, Header.CONTENT_TYPE)),
        parameters={"call_id": _param("The call id (the producer's Nats-Msg-Id).")},
        operation="The router (refusals) or an executor publishes it; the producer reads it by call id.",
    )


def _work(s: Subjects) -> ChannelSpec:
    names = (Header.MSG_ID, Header.CALL_ID, Header.CONTENT_TYPE, *TRACE)
    return ChannelSpec(
        key="work", address=s.work(_slot("pool"), cast(int, _slot("priority"))), message="WorkItem",
        summary="Routed calls waiting for a worker of one pool (stream WORK, work-queue retention).",
        payload=_payload_ref(WorkItem), content_type=CONTENT_MSGPACK, action="receive",
        headers=_headers(names, CONTENT_MSGPACK, required=(Header.MSG_ID, Header.CALL_ID)),
        parameters={"pool": _param("Executor pool name."), "priority": _param("0 critical .. 3 low.", _priorities())},
        operation="Internal: the router publishes it; the pool's executors consume it (consuming removes "
        "it, so only executors should).",
    )


def _event(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="event", address=s.event(_slot("kind")), message="Event",
        summary="Lifecycle events (stream EVENTS).", payload=_payload_ref(Event),
        content_type=CONTENT_MSGPACK, headers=_headers((Header.CONTENT_TYPE, *TRACE), CONTENT_MSGPACK),
        parameters={"kind": _param("Event kind.", [kind.value for kind in EventKind])}, action="receive",
        operation="Internal: the router, executors, budget, context and config services publish them; "
        "audit and context consume them, and any observer may read them.",
    )


def _dlq(s: Subjects) -> ChannelSpec:
    names = (Header.MSG_ID, Header.CONTENT_TYPE, *TRACE)
    return ChannelSpec(
        key="dlq", address=s.dlq(_slot("pool")), message="DeadLetter",
        summary="Calls of one pool whose retries were exhausted, with their failure history (stream DLQ).",
        payload=_payload_ref(DeadLetter), content_type=CONTENT_MSGPACK, action="receive",
        headers=_headers(names, CONTENT_MSGPACK, required=(Header.MSG_ID,)),
        parameters={"pool": _param("Executor pool name.")},
        operation="Internal: an executor publishes it (Nats-Msg-Id `dlq-<call_id>`); operators list and "
        "replay it (`toolbus dlq`).",
    )


def _audit(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="audit", address=s.audit(_slot("log_id"), _slot("chain_id")), message="AuditRecord",
        summary="Hash-chained, writer-signed audit records, one chain per writer (stream AUDIT).",
        payload=_payload_ref(AuditEnvelope),
        content_type=CONTENT_JSON, headers=_headers((Header.MSG_ID,), required=(Header.MSG_ID,)),
        parameters={"log_id": _param("Audit log id."), "chain_id": _param("Chain id, one per writer replica.")},
        action="receive", operation="Internal: the audit logger appends one record per event, with "
        "Nats-Expected-Last-Subject-Sequence so a stale writer fails instead of forking; "
        "`toolbus audit verify` reads them.",
    )


def _audit_checkpoint(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="audit_checkpoint", address=s.audit_checkpoint(_slot("log_id")), message="AuditCheckpoint",
        summary="Signed Merkle checkpoints of one audit log (stream AUDIT_CP).",
        payload={"description": "A C2SP signed note: the log id, tree size, RFC 9162 Merkle root, the chain "
                 "heads and the time, followed by the checkpointer's signature lines."},
        content_type="text/plain; charset=utf-8", parameters={"log_id": _param("Audit log id.")},
        action="receive", operation="Internal: the audit checkpointer publishes them; `toolbus audit verify` "
        "and `toolbus audit prove` check the log against them.",
    )


def _cancel(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="cancel", address=s.cancel(_slot("call_id")), message="CancelCall",
        summary="Core-NATS cancellation of one call.",
        payload={"description": "Empty body: publishing to the subject is the request. The executor running "
                 "the call cancels it and publishes its final result (status `failed`)."},
        parameters={"call_id": _param("The call id to cancel.")}, action="send",
        operation="A producer (or the gateway, for an MCP client) publishes it; the executor running the "
        "call acts on it.",
    )


def _progress(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="progress", address=s.progress(_slot("call_id")), message="ProgressNotification",
        summary="Core-NATS progress notifications of one long-running call.",
        payload={"description": "An MCP `notifications/progress` JSON-RPC notification as the tool sent it: "
                 "`{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":"
                 "…,\"progress\":…,\"total\":…,\"message\":…}}`."},
        content_type=CONTENT_JSON, parameters={"call_id": _param("The call id the progress belongs to.")},
        action="receive", operation="The executor running the call forwards the tool's notifications; the "
        "producer (or the gateway) subscribes.",
    )


def _log(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="log", address=s.log(_slot("call_id")), message="LogNotification",
        summary="Core-NATS log notifications of one running call, for callers that asked for them.",
        payload={"description": "An MCP `notifications/message` JSON-RPC notification as the backend sent it: "
                 "`{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":…,"
                 "\"logger\":…,\"data\":…}}`. Sent only for calls whose `_meta` carries "
                 "`io.modelcontextprotocol/logLevel`."},
        content_type=CONTENT_JSON, parameters={"call_id": _param("The call id the log lines belong to.")},
        action="receive", operation="The executor running the call forwards the backend's log lines; the "
        "producer (or the gateway) subscribes.",
    )


def _input(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="input", address=s.input(_slot("call_id")), message="InputRequest",
        summary="Core-NATS request-reply: a backend asks the caller of a running call for input.",
        payload={"description": "`{\"method\":\"sampling/createMessage\"|\"elicitation/create\",\"params\":"
                 "{…}}` with the MCP request's params as the backend sent them. Reply: `{\"result\":{…}}` (the "
                 "MCP result) or `{\"error\":{\"code\":…,\"message\":…}}`. No responder means the caller "
                 "cannot answer, and the backend gets an error."},
        content_type=CONTENT_JSON, parameters={"call_id": _param("The call id the request belongs to.")},
        action="send", operation="The executor running the call asks; the producer that waits on it "
        "(`ToolbusClient.call(on_input=…)`, the gateway for an MCP client) answers.",
    )


def _resource_updated(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="resource_updated", address=s.resource_updated, message="ResourceUpdated",
        summary="Core-NATS: a backend said one of its listed resources changed.",
        payload={"description": "`{\"server\":…,\"uri\":…}`: the backend server's name and the resource's "
                 "URI, from its `notifications/resources/updated`."},
        content_type=CONTENT_JSON, action="receive",
        operation="Executors watch their backends' listed resources and publish each update; the gateway "
        "tells the MCP clients subscribed to that URI.",
    )


def _mesh(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="mesh", address=s.mesh(_slot("verb")), message="ScaleRequest",
        summary="Core-NATS requests to a running `toolbus up` (verb `scale`; reply: ScaleReply JSON).",
        payload=_payload_ref(ScaleRequest), content_type=CONTENT_JSON,
        parameters={"verb": _param("What to ask the mesh.", ["scale"])}, action="send",
        operation="`toolbus scale POOL N` sends it; the `toolbus up` process changes the pool's local "
        "worker processes and answers a ScaleReply.",
    )


def _budget(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="budget", address=s.budget(_slot("verb")), message="ReserveRequest",
        summary="Core-NATS requests to the budget accountant (queue group `budget`). Verbs and bodies: "
        "`reserve` ReserveRequest → ReserveReply, `settle` SettleRequest → LedgerReply, `release` "
        "ReleaseRequest → LedgerReply, `status` StatusRequest → StatusReply, `set` SetLimitRequest → "
        "AdminReply, `rebuild` RebuildRequest → AdminReply.",
        payload=_payload_ref(ReserveRequest), content_type=CONTENT_MSGPACK,
        parameters={"verb": _param("The accountant operation.",
                                   ["reserve", "settle", "release", "status", "set", "rebuild"])},
        action="send",
        operation="The router reserves; executors settle or release; `toolbus budget` shows, sets and "
        "rebuilds. The budget service answers each.",
    )


CTX_VERBS = ("create", "append", "get", "render", "rescore", "prune", "dedupe", "export", "import", "delete",
             "forget-user", "search")


def _ctx(s: Subjects) -> ChannelSpec:
    return ChannelSpec(
        key="ctx", address=s.ctx(_slot("verb")), message="AppendBlocks",
        summary="Core-NATS requests to the context store (queue group `context`). Verbs and bodies: "
        "`create` CreateSession → SessionReply, `append` AppendBlocks → AppendReply, `get` SessionRef → "
        "SessionReply, `render` RenderContext → RenderReply, `rescore` RescoreSession → ChangeReply, `prune` "
        "PruneSession → ChangeReply, `dedupe` SessionRef → ChangeReply, `export` SessionRef → ExportReply, "
        "`import` ImportSession → SessionReply, `delete` SessionRef → DeleteReply, `forget-user` ForgetUser → "
        "DeleteReply, `search` SearchSessions → SearchReply. A refusal is the reply's `error`: a JSON-RPC "
        "error object (code, message, data.reason).",
        payload=_payload_ref(AppendBlocks), content_type=CONTENT_MSGPACK,
        parameters={"verb": _param("The context-store operation.", list(CTX_VERBS))},
        action="send",
        operation="Agents (SDK `ToolbusClient.context`, `toolbus ctx`) ask; a context-store replica answers.",
    )


CHANNELS: tuple[Callable[[Subjects], ChannelSpec], ...] = (
    _call, _result, _work, _event, _dlq, _audit, _audit_checkpoint, _cancel, _progress, _log, _input,
    _resource_updated, _mesh, _budget, _ctx,
)


# --- AsyncAPI document --------------------------------------------------------------------------


def _message(spec: ChannelSpec) -> JsonObject:
    message: JsonObject = {"name": spec.message, "title": spec.message, "payload": spec.payload}
    if spec.content_type is not None:
        message["contentType"] = spec.content_type
    if spec.headers is not None:
        message["headers"] = spec.headers
    return message


def _channel(spec: ChannelSpec) -> JsonObject:
    channel: JsonObject = {"address": spec.address, "summary": spec.summary, "messages": {spec.message: _message(spec)}}
    return channel | ({"parameters": spec.parameters} if spec.parameters else {})


def _operation(spec: ChannelSpec) -> JsonObject:
    return {
        "action": spec.action,
        "channel": {"$ref": f"#/channels/{spec.key}"},
        "description": spec.operation,
        "messages": [{"$ref": f"#/channels/{spec.key}/messages/{spec.message}"}],
    }


def _info() -> JsonObject:
    try:
        package_version = version("toolbus")
    except PackageNotFoundError:
        package_version = FALLBACK_VERSION
    description = (
        "MCP tool calls carried over NATS. Operations are seen from a bus client (a producer or an observer). "
        f"Subjects are shown under the default prefix `{DEFAULT_PREFIX}`; a mesh may configure another "
        "(`toolbus.yaml: prefix`). Payload schemas are JSON Schema 2020-12 files under `schemas/`; msgpack "
        "bodies are the msgpack encoding of the same JSON value."
    )
    return {"title": "toolbus", "version": package_version, "description": description}


def asyncapi_document(subjects: Subjects) -> JsonObject:
    """The AsyncAPI 3.0 document of every subject family, with streams under `x-toolbus-streams`."""
    specs = [build(subjects) for build in CHANNELS]
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": _info(),
        "defaultContentType": CONTENT_JSON,
        "channels": {spec.key: _channel(spec) for spec in specs},
        "operations": {f"{spec.action}_{spec.key}": _operation(spec) for spec in specs},
        "x-toolbus-streams": {stream.value: {"subjects": subjects.stream_subjects(stream)} for stream in Stream},
    }


# --- files --------------------------------------------------------------------------------------


def render(document: JsonObject) -> str:
    """Deterministic JSON text: sorted keys, indent 2, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def artefacts() -> Artefacts:
    """Every generated file's text, keyed by its path relative to the output directory."""
    files = {f"{SCHEMAS_DIR}/{name}.json": render(schema) for name, schema in json_schemas().items()}
    files[ASYNCAPI_FILE] = render(asyncapi_document(Subjects()))
    return files


def on_disk(out: Path) -> Artefacts:
    """The JSON files currently under `out` (the hand-written README is not compared)."""
    return {path.relative_to(out).as_posix(): path.read_text(encoding="utf-8") for path in sorted(out.rglob("*.json"))}


def differences(expected: Artefacts, actual: Artefacts) -> list[str]:
    """One readable line (plus a diff excerpt for changed files) per file that is missing, extra or stale."""
    problems: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        if path not in actual:
            problems.append(f"missing: {path}")
        elif path not in expected:
            problems.append(f"extra: {path} (no longer generated)")
        elif expected[path] != actual[path]:
            problems.append(f"differs: {path}\n{_diff(path, actual[path], expected[path])}")
    return problems


def _diff(path: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(), new.splitlines(), f"on disk/{path}", f"generated/{path}", n=1, lineterm=""
    )
    excerpt = list(lines)
    more = [f"… {len(excerpt) - DIFF_LINES} more diff lines"] if len(excerpt) > DIFF_LINES else []
    return "\n".join(excerpt[:DIFF_LINES] + more)


def check(out: Path = DEFAULT_OUT) -> list[str]:
    """What differs between `out` and a fresh generation; empty when it is up to date."""
    return differences(artefacts(), on_disk(out) if out.is_dir() else {})


def write(out: Path = DEFAULT_OUT) -> list[str]:
    """Write every artefact under `out`, delete JSON files no longer generated; return the paths changed."""
    expected, actual = artefacts(), on_disk(out) if out.is_dir() else {}
    for path in actual.keys() - expected.keys():
        (out / path).unlink()
    for path, text in expected.items():
        if actual.get(path) != text:
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_text(text, encoding="utf-8", newline="\n")
    return sorted(path for path in expected.keys() | actual.keys() if expected.get(path) != actual.get(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: regenerate `contracts/`, or with `--check` only report whether it is stale."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Generate or check contracts/.")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if anything differs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        if problems:
            print(f"{args.out} is out of date; run `{REGENERATE}`:", *problems, sep="\n", file=sys.stderr)
        return 1 if problems else 0
    changed = write(args.out)
    print(f"{args.out}: {len(changed)} file(s) changed" + "".join(f"\n  {path}" for path in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The routing decision for one call, as a pure function of config, registry and message.

Order of checks: limits and parse → headers → authenticate → authorize (globs, so a caller
learns nothing about tools it may not call) → tool exists → arguments match its inputSchema →
deadline not passed → the pool's backlog is under its bound. The first failure is the answer;
nothing refused is ever executed. The budget reserve comes last, in `budgeting.py` (it is the
one check that needs another service).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.router.validation import (
    ArgumentValidators,
    IngressHeaders,
    parse_body,
    parse_headers,
    request_id_of,
    usable_reply_to,
)
from shared.catalog import CatalogIndex
from shared.config import Config, Principal
from shared.contracts import (
    CatalogEntry,
    PromptGetRequest,
    ResourceReadRequest,
    SetLimitRequest,
    ToolCallRequest,
    ToolSpec,
    WorkItem,
)
from shared.contracts.jsonrpc import RequestId
from shared.errors import CallRefused, DeadlineExceeded, InvalidArguments, Overloaded, ToolbusError, UnknownTool
from shared.outcomes import now_ms
from shared.policy import authenticate, authorize, index_principals, is_allowed
from shared.subjects import Header


@dataclass
class Decision:
    """Where a call goes (`work`) or why it is refused (`refusal`), with what is known of it."""

    call_id: str
    request_id: RequestId | None = None
    principal: str | None = None
    tool: str | None = None
    reply_to: str | None = None
    work: WorkItem | None = None
    refusal: ToolbusError | None = None
    scopes: list[str] = field(default_factory=list)  # the principal's budget scopes, widest first
    economy: ToolSpec | None = None  # a cheaper tool the accountant may pick instead
    arguments: dict[str, Any] | None = None  # as the producer sent them, once the body parsed


@dataclass
class RoutingTable:
    """Config and registered tools, as the router currently knows them."""

    config: Config
    tools: dict[str, ToolSpec] = field(default_factory=dict)
    validators: ArgumentValidators = field(default_factory=ArgumentValidators)
    backlog: dict[str, int] = field(default_factory=dict)  # pool → calls waiting in WORK, refreshed by the app
    runtime_limits: list[SetLimitRequest] = field(default_factory=list)  # set by `toolbus budget set`
    catalog: CatalogIndex = field(default_factory=CatalogIndex)  # backends' prompts, resources, templates

    def __post_init__(self) -> None:
        self._principals = index_principals(self.config.principals)
        self._budgeted = {b.scope for b in self.config.budgets} | {r.scope for r in self.runtime_limits
                                                                   if r.limit_micros is not None}

    def with_config(self, config: Config) -> RoutingTable:
        """The same tools under a new config."""
        return RoutingTable(config, self.tools, self.validators, self.backlog, self.runtime_limits, self.catalog)

    def with_runtime_limits(self, limits: list[SetLimitRequest]) -> RoutingTable:
        """The same table once a limit was set at runtime."""
        return RoutingTable(self.config, self.tools, self.validators, self.backlog, limits, self.catalog)

    def is_budgeted(self, scopes: list[str]) -> bool:
        """True if a spend or rate limit may apply to these scopes, so the call must be reserved.

        A principal no limit names skips the accountant entirely (no round trip, and no
        dependency on it being up)."""
        return self.config.accounting.enabled and any(scope in self._budgeted for scope in scopes)

    def decide(self, headers: Mapping[str, str], body: bytes, call_id: str) -> Decision:
        """Route or refuse one call; refusals are returned, never raised."""
        decision = Decision(call_id=call_id, reply_to=usable_reply_to(headers.get(Header.REPLY_TO)))
        try:
            self._route(decision, headers, body)
        except (CallRefused, DeadlineExceeded) as refusal:
            decision.refusal = refusal
            if decision.request_id is None:
                # Answer with the producer's id if it is readable. Only refusals pay this second
                # parse; a body is at most NATS max_payload (1 MiB by default) long.
                decision.request_id = request_id_of(body)
        return decision

    def _route(self, decision: Decision, headers: Mapping[str, str], body: bytes) -> None:
        request = parse_body(body, self.config.limits)
        if not isinstance(request, ToolCallRequest):
            self._route_catalog(decision, headers, request)
            return
        decision.request_id, decision.tool = request.id, request.params.name
        decision.arguments = request.params.arguments
        ingress = parse_headers(headers, decision.call_id)
        principal = authenticate(ingress.authorization, self._principals)
        decision.principal = principal.name
        authorize(principal, self.config.roles, request.params.name)
        spec = self.tools.get(request.params.name)
        if spec is None:
            raise UnknownTool(f"no tool named {request.params.name!r}")
        self.validators.validate(spec, request.params.arguments)
        self._check_deadline(ingress)
        self._check_backlog(spec.pool)
        decision.scopes = principal.budget_scopes()
        decision.economy = self._economy(spec, principal, request.params.arguments)
        decision.work = self._work_item(request, ingress, spec, principal.name)

    def _route_catalog(
        self, decision: Decision, headers: Mapping[str, str], request: ResourceReadRequest | PromptGetRequest
    ) -> None:
        """A prompt or resource: the same checks as a tool, found by prompt name or resource URI."""
        decision.request_id = request.id
        ingress = parse_headers(headers, decision.call_id)
        principal = authenticate(ingress.authorization, self._principals)
        decision.principal = principal.name
        if isinstance(request, PromptGetRequest):
            decision.tool, decision.arguments = request.params.name, dict(request.params.arguments)
            authorize(principal, self.config.roles, request.params.name)  # by name, before it is looked up
            entry = self.catalog.prompt(request.params.name)
            if entry is None:
                raise UnknownTool(f"no prompt named {request.params.name!r}")
            check_prompt_arguments(entry, request.params.arguments)
            target = entry.name
        else:
            decision.tool, decision.arguments = request.params.uri, None
            entry = self.catalog.resource(request.params.uri)
            if entry is None:
                raise UnknownTool(f"no resource with URI {request.params.uri[:200]!r}")
            decision.tool = entry.public_name
            authorize(principal, self.config.roles, entry.public_name)
            target = request.params.uri
        self._check_deadline(ingress)
        self._check_backlog(entry.pool)
        decision.scopes = principal.budget_scopes()
        decision.work = WorkItem(
            call_id=ingress.call_id, request_id=request.id, method=request.method, public_tool=entry.public_name,
            server=entry.server, tool=target, pool=entry.pool, arguments=decision.arguments or {},
            meta=request.params.meta, principal=principal.name, priority=ingress.priority,
            deadline_ms=ingress.deadline_ms, reply_to=ingress.reply_to, session=None,  # only tool results are filed
            accepted_at_ms=now_ms(),
        )

    @staticmethod
    def _check_deadline(ingress: IngressHeaders) -> None:
        if ingress.deadline_ms is not None and ingress.deadline_ms <= now_ms():
            raise DeadlineExceeded("the call's deadline passed before it was routed")

    def _economy(self, spec: ToolSpec, principal: Principal, arguments: dict[str, Any]) -> ToolSpec | None:
        """The configured economy alternative, if it is registered, allowed and takes these arguments."""
        tool_config = self.config.tools.get(spec.public_name)
        economy = self.tools.get(tool_config.economy) if tool_config and tool_config.economy else None
        if economy is None or not is_allowed(principal, self.config.roles, economy.public_name):
            return None
        try:
            self.validators.validate(economy, arguments)
        except CallRefused:
            return None
        return economy

    def _check_backlog(self, pool: str) -> None:
        """Backpressure: refuse rather than queue without bound when a pool is far behind."""
        waiting = self.backlog.get(pool, 0)
        pool_config = self.config.pools.get(pool)
        if pool_config is not None and waiting >= pool_config.max_backlog:
            raise Overloaded(f"pool {pool!r} has {waiting} calls waiting (bound {pool_config.max_backlog}); "
                             "retry later", backlog=waiting, max_backlog=pool_config.max_backlog)

    @staticmethod
    def _work_item(request: ToolCallRequest, ingress: IngressHeaders, spec: ToolSpec, principal: str) -> WorkItem:
        return WorkItem(
            call_id=ingress.call_id,
            request_id=request.id,
            public_tool=spec.public_name,
            server=spec.server,
            tool=spec.tool,
            pool=spec.pool,
            arguments=request.params.arguments,
            meta=request.params.meta,
            principal=principal,
            priority=ingress.priority,
            deadline_ms=ingress.deadline_ms,
            reply_to=ingress.reply_to,
            session=ingress.session,
            accepted_at_ms=now_ms(),
        )


def check_prompt_arguments(entry: CatalogEntry, arguments: Mapping[str, str]) -> None:
    """Refuse a `prompts/get` that leaves out an argument the prompt declares as required."""
    declared = entry.definition.get("arguments") or []
    missing = [a["name"] for a in declared if isinstance(a, dict) and a.get("required") and a["name"] not in arguments]
    if missing:
        raise InvalidArguments(f"prompt {entry.public_name} requires argument(s) {', '.join(missing)}")

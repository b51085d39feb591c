"""Parsing and validation of the toolbus configuration (``toolbus.yaml``).

The file is YAML with these top-level sections, all optional::

    prefix: toolbus              # NATS subject prefix, [a-z0-9_-]+
    nats: {url: null, replicas: 1}
    redis: {url: null}
    servers: {<name>: {command: ..., args: [...], env: {...}, cwd: ...,
                       pool: default, prefix: ...}         # stdio backend
              <name>: {url: "https://...", headers: {...}, pool: ...}}  # HTTP
    pools:   {<name>: {workers, concurrency, timeout_s, max_deliveries,
                       max_backlog, backoff: {base_s, max_s},
                       breaker: {fail_max, reset_s}}}
    tools:   {<public tool name>: {cost_usd, max_cost_usd, cache_ttl_s,
              model, max_tokens, economy}}
    models:  {<model name>: {input_usd_per_mtok, output_usd_per_mtok}}
    principals: [{name, key_sha256, roles: [...], scope: {org, team, project, user}}]
    roles:   {<name>: {allow: [<glob>...], deny: [<glob>...]}}
    budgets: [{scope: "<org|team|project|user|key>:<name>", limit_usd, window,
               alert_at: [...], rpm, tpm}]
    accounting: {enabled, hold_ttl_s, settle_margin_s, economy_below, timeout_s}
    limits:  {max_body_bytes, max_depth}
    audit:   {enabled, log_id, arguments, checkpoint_every, checkpoint_interval_s,
              signing_key, witness_file, writers, max_skew_s, stale_after_s}

``${VAR}`` in any string value is replaced from the environment. A top-level
section set to null counts as absent. The pool ``default`` always exists.
Every model forbids unknown keys, so typos are refused; any problem raises
:class:`ConfigError` listing the dotted path of each bad field and the reason.
Money is always :class:`~decimal.Decimal`. This module only parses and
validates; it makes no authorization or routing decisions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "BUDGET_SCOPE_KINDS",
    "DEFAULT_POOL",
    "NAME_PATTERN",
    "TOOL_SEPARATOR",
    "AccountingConfig",
    "AuditConfig",
    "BackoffConfig",
    "BreakerConfig",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "LimitsConfig",
    "ModelPrice",
    "NatsConfig",
    "PoolConfig",
    "Principal",
    "PrincipalScope",
    "RedisConfig",
    "Role",
    "ServerConfig",
    "ToolConfig",
    "config_from_json",
    "config_to_json",
    "hash_api_key",
    "load_config",
    "parse_config",
    "public_tool_name",
]

NAME_PATTERN = r"^[a-z0-9_-]+$"
"""Pattern for the subject prefix and for server and pool names."""
TOOL_SEPARATOR = "__"
"""Separator between a server's prefix and the tool name in a public name."""
DEFAULT_POOL = "default"
"""Name of the pool that always exists."""
BUDGET_SCOPE_KINDS = ("org", "team", "project", "user", "key")

_NAME_RE = re.compile(NAME_PATTERN)
_ENV_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_YAML_MERGE = "tag:yaml.org,2002:merge"

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)
_NonEmptyStr = Annotated[str, Field(min_length=1)]
_Money = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(gt=0, le=1)]


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigProblem:
    """One invalid field: its dotted/indexed path (``""`` = whole file) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every bad field."""

    def __init__(
        self, problems: Iterable[ConfigProblem], source: str = "<config>"
    ) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"{self.source}: invalid config"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.source))


class _FieldProblems(ValueError):
    """Raised inside validators to report problems at paths relative to the model."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def _join_path(base: str, sub: str) -> str:
    if not base or not sub:
        return base or sub
    return base + sub if sub.startswith("[") else f"{base}.{sub}"


def _format_loc(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path = _join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    return path


def _problems_from_error(error: Mapping[str, Any]) -> Iterator[ConfigProblem]:
    base = _format_loc(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldProblems):
        for problem in cause.problems:
            yield ConfigProblem(_join_path(base, problem.path), problem.reason)
    elif error["type"] == "value_error" and cause is not None:
        yield ConfigProblem(base, str(cause))
    elif error["type"] == "extra_forbidden":
        yield ConfigProblem(base, _unknown_field_reason(error["loc"]))
    elif error["loc"] and error["loc"][-1] == "[key]":
        yield ConfigProblem(_format_loc(error["loc"][:-1]), f"bad key: {error['msg']}")
    else:
        yield ConfigProblem(base, str(error["msg"]))


def _unknown_field_reason(loc: Sequence[int | str]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown field"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown field{hint} (allowed: {', '.join(allowed)})"


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class found by following ``loc`` from :class:`Config`, if any."""
    current: Any = Config
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            current = None if field is None else field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    is_model = isinstance(current, type) and issubclass(current, BaseModel)
    return current if is_model else None


def _problems_from_validation(exc: ValidationError) -> list[ConfigProblem]:
    return [p for error in exc.errors() for p in _problems_from_error(error)]


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


# --------------------------------------------------------------------------- models


class BackoffConfig(BaseModel):
    """Redelivery delay after a failed attempt: doubles from base_s up to max_s."""

    model_config = _MODEL_CONFIG

    base_s: float = Field(default=0.2, gt=0)
    max_s: float = Field(default=10, gt=0)

    @model_validator(mode="after")
    def _check_order(self) -> BackoffConfig:
        if self.max_s < self.base_s:
            raise _FieldProblems([ConfigProblem("max_s", "must be >= base_s")])
        return self


class BreakerConfig(BaseModel):
    """Circuit breaker: opens after fail_max failures, retries after reset_s."""

    model_config = _MODEL_CONFIG

    fail_max: int = Field(default=5, ge=1)
    reset_s: float = Field(default=30, gt=0)


class PoolConfig(BaseModel):
    """A pool of executor workers serving one or more backend servers."""

    model_config = _MODEL_CONFIG

    workers: int = Field(default=1, ge=0, description="Executor processes.")
    concurrency: int = Field(default=16, ge=1, description="In-flight calls/worker.")
    timeout_s: float = Field(default=30, gt=0, description="Per-call timeout.")
    starvation_share: float = Field(
        default=0.1, gt=0, le=0.5, description="Share of starts taken from the lowest waiting priority."
    )
    ack_wait_s: float = Field(
        default=10, ge=1, description="Redelivery after a silent worker; running calls heartbeat."
    )
    max_deliveries: int = Field(default=4, ge=1, description="Attempts, then DLQ.")
    max_backlog: int = Field(default=10000, ge=1, description="Queued calls, max.")
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


class ServerConfig(BaseModel):
    """A backend MCP server: stdio (``command``) or streamable HTTP (``url``).

    ``args``, ``env`` and ``cwd`` apply only to stdio servers, ``headers`` only
    to HTTP ones. ``prefix`` None means the server name; ``""`` means no prefix.
    """

    model_config = _MODEL_CONFIG

    command: _NonEmptyStr | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: _NonEmptyStr | None = None
    url: _NonEmptyStr | None = Field(default=None, description="http(s) endpoint.")
    headers: dict[str, str] = Field(default_factory=dict)
    app: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:attribute` of an MCPServer the executor runs in-process (no subprocess).",
    )
    pool: str = DEFAULT_POOL
    prefix: str | None = Field(default=None, pattern=r"^[a-z0-9_-]*$")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _check_transport(self) -> ServerConfig:
        problems = list(self._transport_problems())
        if problems:
            raise _FieldProblems(problems)
        return self

    def _transport_problems(self) -> Iterator[ConfigProblem]:
        if [self.command, self.url, self.app].count(None) != 2:
            yield ConfigProblem("", "exactly one of 'command', 'url' or 'app' must be set")
            return
        stdio_only = {"args": self.args, "env": self.env, "cwd": self.cwd}
        for name, value in stdio_only.items():
            if value and self.command is None:
                yield ConfigProblem(name, "only allowed with 'command' (stdio servers)")
        if self.headers and self.url is None:
            yield ConfigProblem("headers", "only allowed with 'url' (HTTP servers)")

    @property
    def transport(self) -> Literal["stdio", "http", "inprocess"]:
        """How the executor reaches the server: a subprocess, a URL, or an import inside itself."""
        if self.command is not None:
            return "stdio"
        return "http" if self.url is not None else "inprocess"

    def tool_prefix(self, server_name: str) -> str:
        """The prefix of this server's public tool names ('' means none)."""
        return server_name if self.prefix is None else self.prefix


def public_tool_name(server_name: str, server: ServerConfig, tool: str) -> str:
    """Public name of ``tool``: ``<prefix>__<tool>``, or ``tool`` if prefix is ''."""
    prefix = server.tool_prefix(server_name)
    return f"{prefix}{TOOL_SEPARATOR}{tool}" if prefix else tool


class ToolConfig(BaseModel):
    """Per public tool settings: price per call, reservation, result cache TTL.

    A token-priced tool names its ``model`` (priced in ``models``) and holds either
    ``max_cost_usd`` or enough for ``max_tokens``; ``economy`` names a cheaper public
    tool the router switches to when the caller's budget runs low.
    """

    model_config = _MODEL_CONFIG

    cost_usd: _Money | None = Field(default=None, description="Charged per call.")
    max_cost_usd: _Money | None = Field(default=None, description="Held up front.")
    cache_ttl_s: float | None = Field(default=None, ge=0)
    model: _NonEmptyStr | None = Field(default=None, description="Model whose token prices apply.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens a call may use (held up front).")
    economy: _NonEmptyStr | None = Field(default=None, description="Cheaper public tool for low budgets.")

    @model_validator(mode="after")
    def _check_costs(self) -> ToolConfig:
        cost, most = self.cost_usd, self.max_cost_usd
        if cost is not None and most is not None and most < cost:
            raise _FieldProblems([ConfigProblem("max_cost_usd", "must be >= cost_usd")])
        if self.model is not None and most is None and self.max_tokens is None:
            reason = "a token-priced tool needs max_tokens or max_cost_usd, so every call has a bounded hold"
            raise _FieldProblems([ConfigProblem("model", reason)])
        return self


class ModelPrice(BaseModel):
    """Token prices of one model in USD per million tokens (so also micro-USD per token)."""

    model_config = _MODEL_CONFIG

    input_usd_per_mtok: _Money = Decimal(0)
    output_usd_per_mtok: _Money = Decimal(0)


class AccountingConfig(BaseModel):
    """How the router and executors use the budget accountant."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, description="Reserve and settle every call's cost.")
    hold_ttl_s: float = Field(default=600, gt=0, description="How long a call without deadline may wait to start.")
    settle_margin_s: float = Field(default=5, gt=0, description="A call's run ends this long before its hold expires.")
    economy_below: float = Field(default=0.2, ge=0, le=1,
                                 description="Remaining budget fraction under which the economy tool is used.")
    timeout_s: float = Field(default=2, gt=0, description="Answer time of the accountant before failing closed.")


class PrincipalScope(BaseModel):
    """Where a principal sits; budgets for these scopes apply to its calls."""

    model_config = _MODEL_CONFIG

    org: _NonEmptyStr | None = None
    team: _NonEmptyStr | None = None
    project: _NonEmptyStr | None = None
    user: _NonEmptyStr | None = None


class Principal(BaseModel):
    """An API client; its key is stored only as ``hash_api_key(key)``."""

    model_config = _MODEL_CONFIG

    name: _NonEmptyStr
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: list[str] = Field(default_factory=list)
    scope: PrincipalScope = Field(default_factory=PrincipalScope)

    def budget_scopes(self) -> list[str]:
        """Every scope whose budgets apply to this principal, widest first (org > … > key)."""
        placed = [f"{kind}:{name}" for kind, name in self.scope.model_dump().items() if name is not None]
        return [*placed, f"key:{self.name}"]


class Role(BaseModel):
    """Allow and deny lists of fnmatch-style globs over public tool names."""

    model_config = _MODEL_CONFIG

    allow: list[_NonEmptyStr] = Field(default_factory=list)
    deny: list[_NonEmptyStr] = Field(default_factory=list)


class BudgetConfig(BaseModel):
    """Spend and/or rate limits for one scope such as ``org:acme`` or ``key:alice``.

    ``alert_at`` holds fractions of ``limit_usd``; ``rpm``/``tpm`` are requests
    and tokens per minute.
    """

    model_config = _MODEL_CONFIG

    scope: str = Field(description="'<org|team|project|user|key>:<name>'.")
    limit_usd: _Money | None = None
    window: Literal["day", "month", "total"] = "day"
    alert_at: list[_Fraction] = Field(default_factory=list)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)

    @field_validator("scope")
    @classmethod
    def _check_scope(cls, scope: str) -> str:
        kind, sep, name = scope.partition(":")
        if not sep or kind not in BUDGET_SCOPE_KINDS or not name:
            kinds = "|".join(BUDGET_SCOPE_KINDS)
            raise ValueError(f"must be '<kind>:<name>' with kind one of {kinds}")
        return scope

    @model_validator(mode="after")
    def _check_limits(self) -> BudgetConfig:
        if self.limit_usd is None and self.rpm is None and self.tpm is None:
            reason = "set at least one of limit_usd, rpm, tpm"
            raise _FieldProblems([ConfigProblem("", reason)])
        if self.alert_at and self.limit_usd is None:
            raise _FieldProblems([ConfigProblem("alert_at", "requires limit_usd")])
        return self

    @property
    def scope_kind(self) -> str:
        """The part of ``scope`` before the colon (org, team, project, user, key)."""
        return self.scope.partition(":")[0]

    @property
    def scope_name(self) -> str:
        """The part of ``scope`` after the colon."""
        return self.scope.partition(":")[2]


class NatsConfig(BaseModel):
    """NATS connection (url None = embedded server) and JetStream replicas."""

    model_config = _MODEL_CONFIG

    url: _NonEmptyStr | None = None
    replicas: Literal[1, 3, 5] = 1


class RedisConfig(BaseModel):
    """Redis connection; ``url`` None means an embedded server."""

    model_config = _MODEL_CONFIG

    url: _NonEmptyStr | None = None


class LimitsConfig(BaseModel):
    """Request limits enforced by the router."""

    model_config = _MODEL_CONFIG

    max_body_bytes: int = Field(default=512 * 1024, ge=1)  # below NATS max_payload (1 MiB), so the router decides
    max_depth: int = Field(default=32, ge=1, description="JSON nesting in arguments.")


class AuditConfig(BaseModel):
    """The audit log: where records go, how arguments are kept, how often it is checkpointed."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, description="Run the audit writer and checkpointer.")
    log_id: str = Field(default="main", pattern=NAME_PATTERN, description="Log id: subject token and note origin.")
    arguments: Literal["redacted", "sha256"] = Field(
        default="redacted", description="Keep arguments with secret-like fields redacted, or only their sha256.")
    checkpoint_every: int = Field(default=1000, ge=1, description="Sign a checkpoint after this many records...")
    checkpoint_interval_s: float = Field(default=10, gt=0, description="...or this long after the last one.")
    signing_key: _NonEmptyStr | None = Field(
        default=None, description="Log signing key file (`toolbus audit keygen`); none: <data-dir>/audit/log.key.")
    witness_file: _NonEmptyStr | None = Field(default=None, description="Also append every checkpoint here.")
    writers: int = Field(default=1, ge=1, le=16, description="Audit writer replicas, one chain each.")
    max_skew_s: float = Field(default=5, ge=0, description="Clock skew the verifier tolerates.")
    stale_after_s: float = Field(default=300, gt=0, description="Verify warns when the newest checkpoint is older.")


class ContextConfig(BaseModel):
    """Context sessions: capacity, pruning, rendering and size limits."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, description="Run the context store.")
    ttl_s: float = Field(default=7 * 86400, gt=0, description="A session unused this long expires.")
    max_tokens: int = Field(default=32_000, ge=1, description="A session's capacity; saturation = tokens / this.")
    prune_at: _Fraction | None = Field(default=0.9, description="Saturation that prunes a session; null: never.")
    prune_to: _Fraction = Field(default=0.7, description="Saturation pruning brings a session down to.")
    decay_half_life_s: float = Field(default=0, ge=0, description="Pruning halves relevance per this age; 0: off.")
    recent_share: _Fraction = Field(default=0.5, description="Render: budget share for the latest USER/AGENT turns.")
    min_relevance: float = Field(default=0.05, ge=0, le=1,
                                 description="Render: TOOL/MEMORY/KNOWLEDGE below it are left out.")
    max_block_bytes: int = Field(default=256 * 1024, ge=1, description="UTF-8 size of one block's content, max.")
    max_blocks: int = Field(default=5000, ge=1, description="Blocks in one session, max.")
    max_session_bytes: int = Field(default=768 * 1024, ge=1024, description="Stored size of one session, max; "
                                   "below NATS max_payload (1 MiB), so a get or export fits one reply.")

    @model_validator(mode="after")
    def _check_prune_range(self) -> ContextConfig:
        if self.prune_at is not None and self.prune_to >= self.prune_at:
            raise ValueError(f"prune_to ({self.prune_to}) must be below prune_at ({self.prune_at})")
        return self


class GatewayConfig(BaseModel):
    """The MCP gateway `toolbus up` runs: where it listens and what it accepts."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, description="Run the MCP gateway.")
    host: str = Field(default="127.0.0.1", description="Listen address; a loopback one turns on Origin checks.")
    port: int = Field(default=8765, ge=0, le=65535, description="Listen port; 0 picks a free one at start.")
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="Larger HTTP bodies get 413.")
    call_timeout_s: float = Field(default=300, gt=0, description="Deadline of a call whose client sets none.")


class Config(BaseModel):
    """The whole toolbus configuration; the pool ``default`` always exists."""

    model_config = _MODEL_CONFIG

    prefix: str = Field(default="toolbus", pattern=NAME_PATTERN)
    nats: NatsConfig = Field(default_factory=NatsConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    servers: dict[str, ServerConfig] = Field(default_factory=dict)
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    principals: list[Principal] = Field(default_factory=list)
    roles: dict[str, Role] = Field(default_factory=dict)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    accounting: AccountingConfig = Field(default_factory=AccountingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    @model_validator(mode="before")
    @classmethod
    def _add_default_pool(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        pools = data.get("pools", {})
        if isinstance(pools, Mapping) and DEFAULT_POOL not in pools:
            data["pools"] = {**pools, DEFAULT_POOL: PoolConfig()}
        return data

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        problems = [
            *_name_problems("servers", self.servers),
            *_name_problems("pools", self.pools),
            *_server_pool_problems(self.servers, self.pools),
            *_server_prefix_problems(self.servers),
            *_principal_problems(self.principals, self.roles),
            *_tool_problems(self.tools, self.models),
            *_budget_problems(self.budgets),
        ]
        if problems:
            raise _FieldProblems(problems)
        return self

    def public_name(self, server_name: str, tool: str) -> str:
        """Public name of ``tool`` on the configured server ``server_name``."""
        return public_tool_name(server_name, self.servers[server_name], tool)


def _name_problems(section: str, names: Iterable[str]) -> Iterator[ConfigProblem]:
    for name in names:
        if not _NAME_RE.match(name):
            yield ConfigProblem(f"{section}.{name}", f"name must match {NAME_PATTERN}")


def _server_pool_problems(
    servers: Mapping[str, ServerConfig], pools: Mapping[str, PoolConfig]
) -> Iterator[ConfigProblem]:
    for name, server in servers.items():
        if server.pool not in pools:
            reason = f"unknown pool {server.pool!r} (known: {_known(pools)})"
            yield ConfigProblem(f"servers.{name}.pool", reason)


def _server_prefix_problems(
    servers: Mapping[str, ServerConfig],
) -> Iterator[ConfigProblem]:
    owners: dict[str, str] = {}
    for name, server in servers.items():
        prefix = server.tool_prefix(name)
        if prefix in owners:
            path = f"servers.{name}" + (".prefix" if server.prefix is not None else "")
            owner = owners[prefix]
            reason = f"public tool prefix {prefix!r} already used by server {owner!r}"
            yield ConfigProblem(path, reason)
        owners.setdefault(prefix, name)


def _principal_problems(
    principals: Sequence[Principal], roles: Mapping[str, Role]
) -> Iterator[ConfigProblem]:
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, principal in enumerate(principals):
        base = f"principals[{i}]"
        for j, role in enumerate(principal.roles):
            if role not in roles:
                reason = f"unknown role {role!r} (known: {_known(roles)})"
                yield ConfigProblem(f"{base}.roles[{j}]", reason)
        if principal.name in names:
            reason = (
                f"duplicate principal name (also principals[{names[principal.name]}])"
            )
            yield ConfigProblem(f"{base}.name", reason)
        if principal.key_sha256 in keys:
            reason = f"duplicate key (also principals[{keys[principal.key_sha256]}])"
            yield ConfigProblem(f"{base}.key_sha256", reason)
        names.setdefault(principal.name, i)
        keys.setdefault(principal.key_sha256, i)


def _tool_problems(tools: Mapping[str, ToolConfig], models: Mapping[str, ModelPrice]) -> Iterator[ConfigProblem]:
    for name, tool in tools.items():
        if tool.model is not None and tool.model not in models:
            yield ConfigProblem(f"tools.{name}.model", f"unknown model {tool.model!r} (known: {_known(models)})")
        if tool.economy == name:
            yield ConfigProblem(f"tools.{name}.economy", "a tool cannot be its own economy tool")


def _budget_problems(budgets: Sequence[BudgetConfig]) -> Iterator[ConfigProblem]:
    """One spend limit per (scope, window) and one rate limit per scope, so no limit shadows another."""
    spends: dict[tuple[str, str], int] = {}
    rates: dict[str, int] = {}
    for i, budget in enumerate(budgets):
        if budget.limit_usd is not None:
            first = spends.setdefault((budget.scope, budget.window), i)
            if first != i:
                yield ConfigProblem(f"budgets[{i}]", f"duplicate {budget.window} limit for {budget.scope} "
                                                     f"(also budgets[{first}])")
        if budget.rpm is not None or budget.tpm is not None:
            first = rates.setdefault(budget.scope, i)
            if first != i:
                yield ConfigProblem(f"budgets[{i}]", f"duplicate rate limit for {budget.scope} (also budgets[{first}])")


# --------------------------------------------------------------------------- loading


def _expand_string(
    value: str, path: str, env: Mapping[str, str], problems: list[ConfigProblem]
) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            problems.append(
                ConfigProblem(path, f"environment variable {name!r} is not set")
            )
            return match.group(0)
        return env[name]

    return _ENV_VAR_RE.sub(replace, value)


def _expand(
    value: Any, path: str, env: Mapping[str, str], problems: list[ConfigProblem]
) -> Any:
    """Return ``value`` with ``${VAR}`` expanded in every string value (not keys)."""
    if isinstance(value, str):
        return _expand_string(value, path, env, problems)
    if isinstance(value, Mapping):
        return {
            k: _expand(v, _join_path(path, str(k)), env, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate already-parsed config data (e.g. JSON from a KV bucket).

    ``${VAR}`` in string values is expanded from ``env`` (default
    ``os.environ``). Raises :class:`ConfigError` naming ``source``.
    """
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(
            [ConfigProblem("", f"top level must be a mapping, got {kind}")], source
        )
    problems: list[ConfigProblem] = []
    expanded = _expand(data, "", os.environ if env is None else env, problems)
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_problems_from_validation(exc), source) from exc


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated mapping key instead of keeping the last."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _YAML_MERGE:
                continue
            if key_node.value in seen:
                reason = f"duplicate key {key_node.value!r}"
                raise yaml.constructor.ConstructorError(
                    None, None, reason, key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> ConfigProblem:
    mark = getattr(exc, "problem_mark", None)
    detail = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return ConfigProblem("", f"invalid YAML: {detail}")
    return ConfigProblem(
        "",
        f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {detail}",
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("", "file not found")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [ConfigProblem("", f"cannot read file: {exc}")], str(path)
        ) from exc


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a YAML config file; an empty file gives defaults."""
    path = Path(path)
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], str(path)) from exc
    return parse_config({} if data is None else data, source=str(path), env=env)


def config_from_json(
    raw: bytes | str, *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Parse and validate JSON config as written by :func:`config_to_json`."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"invalid JSON: {exc}")], source) from exc
    return parse_config(data, source=source, env=env)


def config_to_json(config: Config) -> bytes:
    """Serialize ``config`` to JSON (Decimals as strings) that re-parses equal."""
    return config.model_dump_json().encode("utf-8")


def hash_api_key(key: str) -> str:
    """The sha256 hex digest of the UTF-8 API key, as stored in ``key_sha256``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()

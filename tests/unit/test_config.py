"""Unit tests for shared.config: loading, validation errors, naming and round trips."""

from __future__ import annotations

import json
import pickle
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.config import (
    DEFAULT_POOL,
    Config,
    ConfigError,
    ConfigProblem,
    PoolConfig,
    ServerConfig,
    config_from_json,
    config_to_json,
    hash_api_key,
    load_config,
    parse_config,
    public_tool_name,
)

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "toolbus.example.yaml"
EXAMPLE_ENV = {"REMOTE_TOKEN": "secret-token"}
KEY = hash_api_key("alice-key")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "toolbus.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.problems


def paths_of(data: Any) -> dict[str, str]:
    return {problem.path: problem.reason for problem in problems_of(data)}


# --------------------------------------------------------------------------- loading


def test_example_file_loads() -> None:
    """The shipped toolbus.example.yaml loads and uses every section."""
    config = load_config(EXAMPLE, env=EXAMPLE_ENV)
    assert config.servers["git"].args == ["--repository", "."]
    assert config.servers["remote"].headers["Authorization"] == "Bearer secret-token"
    assert config.pools["git"].backoff.max_s == 10
    assert config.principals[0].scope.org == "acme"
    assert config.roles["analyst"].deny == ["git__git_commit"]
    assert config.budgets[0].scope_kind == "org"
    assert config.limits.max_body_bytes == 512 * 1024
    assert config.tools["demo__summarize"].model == "demo-extractive-1"
    assert config.models["demo-extractive-1"].output_usd_per_mtok == Decimal("1.5")
    assert config.accounting.hold_ttl_s == 600
    assert config.context.prune_at == 0.9 and config.context.max_blocks == 5000
    assert set(Config.model_fields) <= set(json.loads(config_to_json(config)))


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"tools": {"t__a": {"model": "nope", "max_tokens": 5}}}, "tools.t__a.model", "unknown model 'nope'"),
        ({"models": {"m": {}}, "tools": {"t__a": {"model": "m"}}}, "tools.t__a.model", "needs max_tokens"),
        ({"tools": {"t__a": {"economy": "t__a"}}}, "tools.t__a.economy", "its own economy tool"),
        ({"budgets": [{"scope": "user:a", "limit_usd": 1}, {"scope": "user:a", "limit_usd": 2}]},
         "budgets[1]", "duplicate day limit for user:a"),
        ({"budgets": [{"scope": "key:a", "rpm": 1}, {"scope": "key:a", "tpm": 2}]},
         "budgets[1]", "duplicate rate limit for key:a"),
    ],
)
def test_budget_and_pricing_mistakes_are_refused_with_their_path(data: dict[str, object], path: str,
                                                                  reason: str) -> None:
    """Prices and budgets that could not be enforced as written are refused at load, naming the field."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert any(p.path == path and reason in p.reason for p in caught.value.problems), caught.value.problems


def test_a_principal_s_budget_scopes_run_from_org_to_its_key() -> None:
    """Budget scopes come from the principal, widest first, ending with `key:<principal name>`."""
    config = parse_config({"principals": [{"name": "al", "key_sha256": "0" * 64,
                                           "scope": {"org": "o", "project": "p", "user": "u"}}]}, env={})
    assert config.principals[0].budget_scopes() == ["org:o", "project:p", "user:u", "key:al"]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file loads as the default Config."""
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_null_section_counts_as_absent(tmp_path: Path) -> None:
    """A top-level section left empty in YAML is treated as not given."""
    config = load_config(write(tmp_path, "servers:\npools:\n"), env={})
    assert config.servers == {}


def test_default_pool_is_implicit() -> None:
    """The pool 'default' exists with default settings even when not configured."""
    config = parse_config({"servers": {"time": {"command": "mcp-server-time"}}}, env={})
    assert config.pools[DEFAULT_POOL] == PoolConfig()
    assert Config().pools[DEFAULT_POOL].concurrency == 16


def test_configured_default_pool_is_kept() -> None:
    """A configured 'default' pool keeps its own settings."""
    config = parse_config({"pools": {"default": {"workers": 3}}}, env={})
    assert config.pools[DEFAULT_POOL].workers == 3


def test_money_stays_decimal() -> None:
    """Costs and limits parse to exact Decimals, never floats."""
    config = load_config(EXAMPLE, env=EXAMPLE_ENV)
    tool = config.tools["git__git_log"]
    assert tool.cost_usd == Decimal("0.001")
    assert isinstance(tool.cost_usd, Decimal)
    assert config.budgets[0].limit_usd == Decimal(100)


# --------------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [(None, "git__log"), ("vcs", "vcs__log"), ("", "log")],
)
def test_public_tool_name(prefix: str | None, expected: str) -> None:
    """Public names are <server>__tool, <prefix>__tool, or the bare tool for ''."""
    server = ServerConfig(command="mcp-server-git", prefix=prefix)
    assert public_tool_name("git", server, "log") == expected
    config = Config(servers={"git": server})
    assert config.public_name("git", "log") == expected


def test_colliding_prefixes_are_refused() -> None:
    """Two servers whose public tool prefix is the same are refused."""
    servers = {
        "git": {"command": "a"},
        "vcs": {"command": "b", "prefix": "git"},
        "x": {"command": "c", "prefix": ""},
        "y": {"command": "d", "prefix": ""},
    }
    found = paths_of({"servers": servers})
    assert "already used by server 'git'" in found["servers.vcs.prefix"]
    assert "already used by server 'x'" in found["servers.y.prefix"]


# --------------------------------------------------------------------------- env


def test_env_vars_expand(tmp_path: Path) -> None:
    """${VAR} in string values is replaced from the given environment."""
    text = 'servers:\n  r: {url: "https://${HOST}/mcp", headers: {X-Key: "${KEY}"}}\n'
    config = load_config(write(tmp_path, text), env={"HOST": "h:1", "KEY": "k"})
    assert config.servers["r"].url == "https://h:1/mcp"
    assert config.servers["r"].headers == {"X-Key": "k"}


def test_missing_env_var_names_variable_and_path(tmp_path: Path) -> None:
    """A missing variable is an error naming the variable and the field path."""
    path = write(tmp_path, 'servers:\n  r: {command: x, args: ["${NOPE}"]}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == [
        ConfigProblem("servers.r.args[0]", "environment variable 'NOPE' is not set")
    ]
    assert str(path) in str(info.value)


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit env, variables come from os.environ."""
    monkeypatch.setenv("TOOLBUS_TEST_CMD", "mcp-server-time")
    config = parse_config({"servers": {"t": {"command": "${TOOLBUS_TEST_CMD}"}}})
    assert config.servers["t"].command == "mcp-server-time"


# --------------------------------------------------------------------------- errors


def test_unknown_pool_names_path_and_known_pools() -> None:
    """A server naming an unknown pool is refused with its path and the known pools."""
    data = {"servers": {"git": {"command": "g", "pool": "gitx"}}, "pools": {"git": {}}}
    found = paths_of(data)
    assert found == {"servers.git.pool": "unknown pool 'gitx' (known: default, git)"}


def test_unknown_role_names_path_and_known_roles() -> None:
    """A principal with an unknown role is refused with its path and the known roles."""
    data = {
        "principals": [{"name": "alice", "key_sha256": KEY, "roles": ["analyst", "x"]}],
        "roles": {"analyst": {"allow": ["*"]}},
    }
    assert paths_of(data) == {
        "principals[0].roles[1]": "unknown role 'x' (known: analyst)"
    }


def test_bad_name_pattern_is_refused() -> None:
    """Server and pool names outside [a-z0-9_-]+ are refused."""
    found = paths_of({"servers": {"Git": {"command": "g"}}, "pools": {"a.b": {}}})
    assert set(found) == {"servers.Git", "pools.a.b"}
    assert "must match" in found["servers.Git"]


def test_bad_subject_prefix_is_refused() -> None:
    """A subject prefix outside [a-z0-9_-]+ is refused."""
    assert set(paths_of({"prefix": "tool.bus"})) == {"prefix"}


def test_command_and_url_together_are_refused() -> None:
    """A server with both command and url is refused."""
    found = paths_of({"servers": {"s": {"command": "x", "url": "http://h/mcp"}}})
    assert found == {"servers.s": "exactly one of 'command', 'url' or 'app' must be set"}


def test_inprocess_app_is_a_third_transport() -> None:
    """`app: module:attribute` selects the in-process transport and refuses stdio/http-only fields."""
    config = parse_config({"servers": {"demo": {"app": "services.demo_tools.server:app"}}})
    assert config.servers["demo"].transport == "inprocess"
    found = paths_of({"servers": {"d": {"app": "m:a", "args": ["x"]}, "e": {"app": "not an import path"}}})
    assert found["servers.d.args"] == "only allowed with 'command' (stdio servers)"
    assert "servers.e.app" in found


def test_transport_specific_fields_are_refused() -> None:
    """args/env/cwd need a command, headers need a url, and url must be http(s)."""
    servers = {
        "h": {"url": "https://h/mcp", "env": {"A": "1"}, "cwd": "/"},
        "s": {"command": "x", "headers": {"A": "1"}},
        "f": {"url": "ftp://h/mcp"},
    }
    found = paths_of({"servers": servers})
    assert set(found) == {
        "servers.h.env",
        "servers.h.cwd",
        "servers.s.headers",
        "servers.f.url",
    }


def test_typo_key_is_refused_with_path() -> None:
    """An unknown key is refused at its path with a did-you-mean hint."""
    found = paths_of({"pools": {"git": {"workerz": 2}}})
    assert list(found) == ["pools.git.workerz"]
    assert "did you mean 'workers'" in found["pools.git.workerz"]


def test_non_string_key_is_refused() -> None:
    """A mapping key that is not a string is refused at its path."""
    found = paths_of({"servers": {"a": {"command": "x", "env": {1: "v"}}}})
    assert found == {"servers.a.env[1]": "bad key: Input should be a valid string"}


def test_models_are_frozen() -> None:
    """Config models refuse attribute assignment after validation."""
    config = Config()
    with pytest.raises(ValidationError):
        setattr(config, "prefix", "other")  # noqa: B010 - bypass static typing


def test_bad_key_sha256_is_refused() -> None:
    """A key_sha256 that is not 64 lowercase hex digits is refused."""
    data = {"principals": [{"name": "a", "key_sha256": KEY.upper()}]}
    assert paths_of(data) == {
        "principals[0].key_sha256": "String should match pattern '^[0-9a-f]{64}$'"
    }


def test_duplicate_principals_are_refused() -> None:
    """Principal names and key hashes must be unique."""
    principals = [{"name": "a", "key_sha256": KEY}, {"name": "a", "key_sha256": KEY}]
    assert set(paths_of({"principals": principals})) == {
        "principals[1].name",
        "principals[1].key_sha256",
    }


def test_budget_rules_are_enforced() -> None:
    """Budgets need a valid scope and a limit; alert_at needs limit_usd and (0, 1]."""
    budgets = [
        {"scope": "galaxy:x", "rpm": 1},
        {"scope": "org:a"},
        {"scope": "org:a", "rpm": 5, "alert_at": [0.5]},
        {"scope": "org:a", "limit_usd": 1, "alert_at": [1.5]},
    ]
    assert set(paths_of({"budgets": budgets})) == {
        "budgets[0].scope",
        "budgets[1]",
        "budgets[2].alert_at",
        "budgets[3].alert_at[0]",
    }


def test_max_cost_below_cost_is_refused() -> None:
    """max_cost_usd below cost_usd is refused."""
    data = {"tools": {"t": {"cost_usd": "0.01", "max_cost_usd": "0.001"}}}
    assert paths_of(data) == {"tools.t.max_cost_usd": "must be >= cost_usd"}


def test_error_message_is_readable() -> None:
    """str(ConfigError) is a header line then one indented line per problem."""
    error = ConfigError(
        [ConfigProblem("a.b", "bad"), ConfigProblem("c", "worse")], "x.yaml"
    )
    assert str(error) == "x.yaml: invalid config\n  a.b: bad\n  c: worse"
    assert isinstance(error, ValueError)


def test_config_error_pickles() -> None:
    """ConfigError survives pickling with its problems and source."""
    error = ConfigError([ConfigProblem("a", "bad")], "x.yaml")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, copy.source, str(copy)) == (
        error.problems,
        "x.yaml",
        str(error),
    )


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    """A YAML syntax error becomes a ConfigError giving the line."""
    path = write(tmp_path, "servers:\n  a: {command: x\n  b: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "invalid YAML at line 3" in info.value.problems[0].reason


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    """A key repeated in one YAML mapping is refused rather than silently overridden."""
    path = write(tmp_path, "servers:\n  a: {command: x}\n  a: {command: y}\n")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(path, env={})


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    """YAML merge keys may override merged values without counting as duplicates."""
    text = (
        "pools:\n"
        "  a: &base {workers: 2, concurrency: 3}\n"
        "  b: {<<: *base, workers: 5}\n"
    )
    config = load_config(write(tmp_path, text), env={})
    assert (config.pools["b"].workers, config.pools["b"].concurrency) == (5, 3)


def test_non_mapping_top_level_is_refused(tmp_path: Path) -> None:
    """A file whose top level is not a mapping is refused."""
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing file is a ConfigError with reason 'file not found'."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.problems == [ConfigProblem("", "file not found")]


def test_invalid_json_is_refused() -> None:
    """config_from_json refuses text that is not JSON."""
    with pytest.raises(ConfigError, match="invalid JSON"):
        config_from_json(b"{nope", env={})


# --------------------------------------------------------------------------- round trip


def test_json_round_trip_is_equal() -> None:
    """A config serialized with config_to_json re-parses to an equal Config."""
    config = load_config(EXAMPLE, env=EXAMPLE_ENV)
    raw = config_to_json(config)
    assert parse_config(json.loads(raw), env={}) == config
    assert config_from_json(raw, env={}) == config
    assert json.loads(raw)["tools"]["git__git_log"]["cost_usd"] == "0.001"


def test_hash_api_key_known_vector() -> None:
    """hash_api_key is the sha256 hex digest of the UTF-8 key."""
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


_names = st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)


@settings(max_examples=50, database=None, deadline=None)
@given(
    principals=st.lists(_names, unique=True, max_size=5),
    pools=st.lists(_names, unique=True, min_size=1, max_size=5),
    cost=st.decimals(min_value=0, max_value=1000, places=6),
)
def test_round_trip_property(
    principals: list[str], pools: list[str], cost: Decimal
) -> None:
    """Any valid principals, pools and costs survive the JSON round trip unchanged."""
    data = {
        "pools": {name: {"workers": i} for i, name in enumerate(pools)},
        "servers": {f"s{i}": {"command": "x", "pool": p} for i, p in enumerate(pools)},
        "principals": [{"name": n, "key_sha256": hash_api_key(n)} for n in principals],
        "tools": {"t": {"cost_usd": str(cost)}},
    }
    config = parse_config(data, env={})
    assert config_from_json(config_to_json(config), env={}) == config
    assert config.tools["t"].cost_usd == cost


def test_context_prune_target_must_be_below_the_trigger() -> None:
    """A context.prune_to at or above prune_at is a config error naming both values."""
    with pytest.raises(ConfigError) as error:
        parse_config({"context": {"prune_at": 0.5, "prune_to": 0.6}})
    assert "prune_to (0.6) must be below prune_at (0.5)" in str(error.value)
    assert parse_config({"context": {"prune_at": None, "prune_to": 0.6}}).context.prune_at is None

"""Unit tests for shared.policy: API-key authentication and role allow/deny globs."""

from __future__ import annotations

import pytest

from shared.config import Principal, Role, hash_api_key
from shared.errors import CallRefused, Forbidden, Reason, Unauthenticated
from shared.policy import authenticate, authorize, index_principals, is_allowed

pytestmark = pytest.mark.unit

ALICE_KEY = "alice-secret-key"
BOB_KEY = "bob-secret-key"

ALICE = Principal(name="alice", key_sha256=hash_api_key(ALICE_KEY), roles=["analyst"])
BOB = Principal(name="bob", key_sha256=hash_api_key(BOB_KEY), roles=["admin"])
PRINCIPALS = index_principals([ALICE, BOB])

ROLES = {
    "analyst": Role(allow=["time__*", "git__git_log", "demo__*"], deny=["demo__crash"]),
    "admin": Role(allow=["*"]),
    "no_secrets": Role(deny=["vault__*"]),
}


def principal(*roles: str) -> Principal:
    """A principal holding exactly the given role names."""
    return Principal(name="carol", key_sha256=hash_api_key("carol-key"), roles=list(roles))


# --------------------------------------------------------------------------- authenticate


def test_index_principals_keys_by_hash() -> None:
    """Principals are indexed by the sha256 of their key, never by the key itself."""
    indexed = index_principals([ALICE, BOB])
    assert indexed == {hash_api_key(ALICE_KEY): ALICE, hash_api_key(BOB_KEY): BOB}
    assert ALICE_KEY not in indexed


def test_good_key_authenticates_its_principal() -> None:
    """A bearer header carrying a known key yields the principal owning that key."""
    assert authenticate(f"Bearer {ALICE_KEY}", PRINCIPALS) is ALICE
    assert authenticate(f"Bearer {BOB_KEY}", PRINCIPALS) is BOB


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    """The `Bearer` scheme name is matched case-insensitively."""
    assert authenticate(f"{scheme} {ALICE_KEY}", PRINCIPALS) is ALICE


def test_surrounding_whitespace_of_the_key_is_ignored() -> None:
    """Extra spaces around the key do not change which principal it authenticates."""
    assert authenticate(f"Bearer   {ALICE_KEY}  ", PRINCIPALS) is ALICE


def test_key_is_case_sensitive() -> None:
    """A key differing only in letter case is an unknown key."""
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticate(f"Bearer {ALICE_KEY.upper()}", PRINCIPALS)


@pytest.mark.parametrize("authorization", [None, ""])
def test_missing_header_is_unauthenticated(authorization: str | None) -> None:
    """A call without an Authorization header is refused as unauthenticated."""
    with pytest.raises(Unauthenticated, match="missing API key"):
        authenticate(authorization, PRINCIPALS)


@pytest.mark.parametrize(
    "authorization",
    [ALICE_KEY, f"Basic {ALICE_KEY}", f"Token {ALICE_KEY}", f"Bearer{ALICE_KEY}", "Bearer", f"Bearer\t{ALICE_KEY}"],
)
def test_non_bearer_scheme_is_unauthenticated(authorization: str) -> None:
    """Anything but `Bearer <key>` (other schemes, a bare key, no separating space) is refused."""
    with pytest.raises(Unauthenticated, match="missing API key"):
        authenticate(authorization, PRINCIPALS)


@pytest.mark.parametrize("authorization", ["Bearer ", "Bearer    ", "bearer \t "])
def test_empty_key_is_unauthenticated(authorization: str) -> None:
    """A bearer header whose key is empty or blank is refused as an unknown key."""
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticate(authorization, PRINCIPALS)


def test_empty_key_is_refused_even_if_its_hash_is_registered() -> None:
    """The empty key never authenticates, even when some principal was configured with its hash."""
    empty = Principal(name="nobody", key_sha256=hash_api_key(""), roles=["admin"])
    with pytest.raises(Unauthenticated):
        authenticate("Bearer ", index_principals([empty]))


def test_unknown_key_is_unauthenticated() -> None:
    """A well-formed bearer header with a key nobody owns is refused."""
    with pytest.raises(Unauthenticated, match="unknown API key"):
        authenticate("Bearer not-a-configured-key", PRINCIPALS)


def test_key_hash_itself_is_not_a_key() -> None:
    """Sending the stored sha256 instead of the key does not authenticate."""
    with pytest.raises(Unauthenticated):
        authenticate(f"Bearer {hash_api_key(ALICE_KEY)}", PRINCIPALS)


def test_unauthenticated_error_code_and_reason() -> None:
    """An authentication failure is a refusal with code -32001 and reason `unauthenticated`."""
    with pytest.raises(Unauthenticated) as caught:
        authenticate("Bearer wrong", PRINCIPALS)
    error = caught.value
    assert isinstance(error, CallRefused)
    assert error.code == -32001
    assert error.reason is Reason.UNAUTHENTICATED
    wire = error.to_jsonrpc("call-1")
    assert wire["code"] == -32001
    assert wire["data"]["reason"] == "unauthenticated"
    assert "wrong" not in wire["message"]


# --------------------------------------------------------------------------- authorize / is_allowed


@pytest.mark.parametrize("tool", ["time__get_current_time", "time__convert_time", "git__git_log", "demo__echo"])
def test_allow_glob_grants_matching_tools(tool: str) -> None:
    """A tool matching one of the role's allow globs is allowed."""
    assert is_allowed(ALICE, ROLES, tool)
    authorize(ALICE, ROLES, tool)


@pytest.mark.parametrize("tool", ["git__git_commit", "git__git_log_extra", "time", "other__time__x", ""])
def test_tools_outside_allow_globs_are_not_allowed(tool: str) -> None:
    """A tool matching no allow glob is not allowed (globs match the whole name)."""
    assert not is_allowed(ALICE, ROLES, tool)


def test_globs_are_case_sensitive() -> None:
    """Glob matching is case-sensitive on every platform."""
    assert not is_allowed(ALICE, ROLES, "TIME__get_current_time")


def test_deny_glob_beats_allow_glob_of_the_same_role() -> None:
    """A tool matching both an allow and a deny glob of one role is not allowed."""
    assert is_allowed(ALICE, ROLES, "demo__echo")
    assert not is_allowed(ALICE, ROLES, "demo__crash")


def test_deny_of_one_role_beats_allow_of_another() -> None:
    """A deny glob of any held role wins over an allow glob of another held role."""
    admin_without_secrets = principal("admin", "no_secrets")
    assert is_allowed(admin_without_secrets, ROLES, "time__get_current_time")
    assert not is_allowed(admin_without_secrets, ROLES, "vault__read")
    assert is_allowed(principal("admin"), ROLES, "vault__read")


def test_deny_wins_regardless_of_role_order() -> None:
    """The order in which roles are listed does not change a deny's effect."""
    assert not is_allowed(principal("no_secrets", "admin"), ROLES, "vault__read")
    assert not is_allowed(principal("admin", "no_secrets"), ROLES, "vault__read")


def test_unknown_role_names_are_ignored() -> None:
    """A role name missing from the roles table grants nothing and denies nothing."""
    assert is_allowed(principal("ghost", "admin"), ROLES, "vault__read")
    assert not is_allowed(principal("ghost"), ROLES, "time__get_current_time")


def test_no_roles_means_forbidden() -> None:
    """A principal with no roles may call nothing."""
    nobody = principal()
    assert not is_allowed(nobody, ROLES, "time__get_current_time")
    with pytest.raises(Forbidden):
        authorize(nobody, ROLES, "time__get_current_time")


def test_deny_only_role_grants_nothing() -> None:
    """A role with only deny globs allows no tool by itself."""
    assert not is_allowed(principal("no_secrets"), ROLES, "time__get_current_time")


def test_forbidden_error_code_reason_and_message() -> None:
    """An authorization failure is a refusal with code -32003, reason `forbidden`, naming principal and tool."""
    with pytest.raises(Forbidden) as caught:
        authorize(ALICE, ROLES, "demo__crash")
    error = caught.value
    assert isinstance(error, CallRefused)
    assert error.code == -32003
    assert error.reason is Reason.FORBIDDEN
    assert "'alice'" in error.message
    assert "'demo__crash'" in error.message
    assert error.to_jsonrpc("call-2")["data"] == {"reason": "forbidden", "call_id": "call-2"}

"""Who may call what: API-key authentication and role allow/deny globs.

The router enforces these rules on every call; the gateway applies the same ones to decide
what a caller is shown. Prompts and resources are judged by their public names, like tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from shared.config import Principal, Role, hash_api_key
from shared.errors import Forbidden, Unauthenticated

BEARER = "bearer "


def authenticate(authorization: str | None, principals_by_key_hash: Mapping[str, Principal]) -> Principal:
    """The principal owning the bearer key; keys are looked up only by their sha256."""
    if not authorization or not authorization.lower().startswith(BEARER):
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    key = authorization[len(BEARER) :].strip()
    principal = principals_by_key_hash.get(hash_api_key(key)) if key else None
    if principal is None:
        raise Unauthenticated("unknown API key")
    return principal


def index_principals(principals: list[Principal]) -> dict[str, Principal]:
    """Principals by key hash, the only form in which keys are stored."""
    return {p.key_sha256: p for p in principals}


def is_allowed(principal: Principal, roles: Mapping[str, Role], tool: str) -> bool:
    """A deny glob of any role wins; otherwise an allow glob of some role is needed."""
    granted = [roles[name] for name in principal.roles if name in roles]
    if any(fnmatchcase(tool, pattern) for role in granted for pattern in role.deny):
        return False
    return any(fnmatchcase(tool, pattern) for role in granted for pattern in role.allow)


def authorize(principal: Principal, roles: Mapping[str, Role], tool: str) -> None:
    """Refuse with `forbidden` unless the principal's roles allow the tool."""
    if not is_allowed(principal, roles, tool):
        raise Forbidden(f"principal {principal.name!r} may not call {tool!r}")


"""Who is calling the gateway: the bearer key of the HTTP request, checked as the router checks it.

The gateway authenticates only to answer early (HTTP 401 before any MCP work) and to filter
`tools/list`; it forwards the caller's own key with every bus call, so the router
authenticates and authorizes again and the gateway can never widen anyone's access.

Keys and roles are judged by `shared.policy`, the rules the router applies, so the two can
never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken

from shared.config import Principal
from shared.errors import Unauthenticated
from shared.policy import BEARER, authenticate


class ApiKeyVerifier:
    """The SDK's `TokenVerifier` for toolbus API keys: a key is valid if its sha256 names a principal.

    Principals are read through `principals_by_key_hash` on every request, so a config change
    (a key revoked, a principal added) applies to the next request without a restart.
    """

    def __init__(self, principals_by_key_hash: Callable[[], Mapping[str, Principal]]) -> None:
        self._principals = principals_by_key_hash

    async def verify_token(self, token: str) -> AccessToken | None:
        """The access token for a known key (client id = principal name), None for anything else."""
        try:
            principal = authenticate(f"{BEARER}{token}", self._principals())
        except Unauthenticated:
            return None
        # The key itself travels in `token`: the gateway forwards it with the caller's bus calls.
        return AccessToken(token=token, client_id=principal.name, scopes=[])


def bearer_key() -> str:
    """The verified API key of the HTTP request being handled (the SDK's auth context holds it).

    Only reachable without one if the app were mounted without the bearer middleware, so that
    case is refused rather than served anonymously.
    """
    token = get_access_token()
    if token is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    return token.token


def caller(key: str, principals_by_key_hash: Mapping[str, Principal]) -> Principal:
    """The principal owning `key`, against the current config (raises `Unauthenticated`)."""
    return authenticate(f"{BEARER}{key}", principals_by_key_hash)

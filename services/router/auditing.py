"""What the router tells the audit log about a call's arguments: redacted or hashed, and a risk score.

Arguments leave the router only through this function, so a secret in them never reaches
EVENTS (and so never the audit log): secret-named fields and credential-shaped values are
redacted, or with `audit.arguments: sha256` only the digest of their RFC 8785 JSON is kept.
"""

from __future__ import annotations

from typing import Any

from services.router.decision import Decision
from services.router.risk import risk_score
from shared.audit.entries import arguments_digest
from shared.config import AuditConfig
from shared.telemetry import redact


def argument_fields(decision: Decision, audit: AuditConfig) -> dict[str, Any]:
    """Event fields about the call's arguments: `arguments` or `arguments_sha256`, and `risk`."""
    if decision.arguments is None:
        return {}
    fields: dict[str, Any] = {"risk": risk_score(decision.arguments).score}
    if audit.arguments == "sha256":
        fields["arguments_sha256"] = arguments_digest(decision.arguments)
    else:
        fields["arguments"] = redact(decision.arguments)
    return fields


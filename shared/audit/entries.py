"""Audit records as bytes: canonical hashing, writer signatures and key certificates.

The hash is computed over the record body exactly as it travels (the JSON object under
`body`), canonicalized with RFC 8785, so a reader needs no toolbus model to recompute it.
Signatures are domain-separated, so a record signature can never pass for a certificate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

import rfc8785

from shared.audit.notes import SigningKey, VerifierKey

GENESIS_PREV = "0" * 64  # `prev` of a chain's first record: 32 zero bytes, hex
RECORD_DOMAIN = b"toolbus-audit-record-v1\n"
WRITER_CERT_DOMAIN = b"toolbus-audit-writer-v1\n"


class RecordError(ValueError):
    """Bytes that are not a well-formed audit record."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a JSON value; RecordError for values JCS cannot represent."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as error:
        raise RecordError(f"not canonicalizable: {error}") from error


def arguments_digest(value: Any) -> str:
    """Hex SHA-256 of a JSON value's RFC 8785 form; for values JCS cannot hold (NaN, integers past
    2**53), of its sorted-keys JSON instead, so every value has one stable digest."""
    try:
        canonical = canonical_json(value)
    except RecordError:
        canonical = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()


def entry_hash(body: dict[str, Any]) -> bytes:
    """SHA-256(0x00 ‖ JCS(body)): the record's hash and its Merkle leaf."""
    return hashlib.sha256(b"\x00" + canonical_json(body)).digest()


def sign_record(key: SigningKey, digest: bytes) -> str:
    """The writer's base64 signature of a record hash."""
    return base64.b64encode(key.sign(RECORD_DOMAIN + digest)).decode()


def record_signed_by(key: VerifierKey, digest: bytes, signature: str) -> bool:
    """True when `signature` is `key`'s signature of the record hash `digest`."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return key.verify(raw, RECORD_DOMAIN + digest)


def _cert_message(log_id: str, chain_id: str, writer_key: str) -> bytes:
    return WRITER_CERT_DOMAIN + f"{log_id}\n{chain_id}\n{writer_key}\n".encode()


def certify_writer(log_key: SigningKey, log_id: str, chain_id: str, writer_key: str) -> str:
    """The log key's base64 certificate that `writer_key` may write chain `chain_id` of `log_id`."""
    return base64.b64encode(log_key.sign(_cert_message(log_id, chain_id, writer_key))).decode()


def writer_certified(log_key: VerifierKey, log_id: str, chain_id: str, writer_key: str, cert: str) -> bool:
    """True when `cert` is the log key's certificate of this writer key for this chain."""
    try:
        raw = base64.b64decode(cert, validate=True)
    except (binascii.Error, ValueError):
        return False
    return log_key.verify(raw, _cert_message(log_id, chain_id, writer_key))


def encode_record(body: dict[str, Any], key: SigningKey) -> tuple[bytes, bytes]:
    """The message bytes of a record and its hash."""
    digest = entry_hash(body)
    envelope = {"body": body, "hash": digest.hex(), "sig": sign_record(key, digest)}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode(), digest


def decode_record(data: bytes) -> tuple[dict[str, Any], bytes, str]:
    """(body, recomputed hash, signature) of message bytes; RecordError if they are not a record.

    The stored `hash` must equal the recomputed one: a changed body with a stale hash is caught here.
    """
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"not JSON: {error}") from error
    if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), dict):
        raise RecordError("not an audit record: no `body` object")
    if not isinstance(envelope.get("hash"), str) or not isinstance(envelope.get("sig"), str):
        raise RecordError("not an audit record: `hash` and `sig` must be strings")
    digest = entry_hash(envelope["body"])
    if envelope["hash"] != digest.hex():
        raise RecordError("stored hash does not match the body")
    return envelope["body"], digest, envelope["sig"]

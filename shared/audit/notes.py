"""Ed25519 keys and signed notes in the C2SP `signed-note` format (golang.org/x/mod/sumdb/note).

A verifier key reads `<name>+<hash>+<base64(0x01 ‖ public key)>`, a signing key
`PRIVATE+KEY+<name>+<hash>+<base64(0x01 ‖ seed)>`, where `<hash>` is 8 hex digits: the first
four bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key). A note is its text (ending in a newline),
a blank line, then one line per signature: `— <name> <base64(key hash ‖ signature)>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

ED25519 = 1  # the signed-note algorithm byte for Ed25519
PRIVATE_PREFIX = "PRIVATE+KEY+"
SIGNATURE_DASH = "\u2014"  # "—", as the format requires


class NoteError(ValueError):
    """A malformed key or note, or a note no trusted key signed."""


def _key_hash(name: str, public: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "+ \n\t") or not name.isprintable():
        raise NoteError(f"key name {name!r} must be non-empty, printable, without '+' or spaces")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise NoteError(f"{what} is not valid base64") from error


@dataclass(frozen=True)
class VerifierKey:
    """A public key that checks signatures of one name."""

    name: str
    key_hash: int
    public: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Read `<name>+<hash>+<base64>`; refuse a hash that does not match the key."""
        parts = text.strip().split("+", 2)  # base64 may contain "+"
        if len(parts) != 3 or len(parts[1]) != 8:
            raise NoteError("a verifier key reads <name>+<8 hex digits>+<base64 key>")
        name, hash_hex, encoded = parts
        _check_name(name)
        raw = _b64decode(encoded, "verifier key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("verifier key is not an Ed25519 key")
        if int(hash_hex, 16) != _key_hash(name, raw[1:]):
            raise NoteError(f"verifier key {name}: hash does not match the key")
        return cls(name, int(hash_hex, 16), Ed25519PublicKey.from_public_bytes(raw[1:]))

    def __str__(self) -> str:
        raw = self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}+{self.key_hash:08x}+{base64.b64encode(bytes([ED25519]) + raw).decode()}"

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's signature of `message`."""
        try:
            self.public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """A private key and its name."""

    name: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        _check_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        """Read `PRIVATE+KEY+<name>+<hash>+<base64 seed>`."""
        if not text.startswith(PRIVATE_PREFIX):
            raise NoteError("a signing key starts with PRIVATE+KEY+")
        parts = text.strip()[len(PRIVATE_PREFIX):].split("+", 2)
        if len(parts) != 3:
            raise NoteError("a signing key reads PRIVATE+KEY+<name>+<hash>+<base64 seed>")
        raw = _b64decode(parts[2], "signing key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("signing key is not an Ed25519 key")
        key = cls(parts[0], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if int(parts[1], 16) != key.verifier.key_hash:
            raise NoteError(f"signing key {parts[0]}: hash does not match the key")
        return key

    @property
    def verifier(self) -> VerifierKey:
        public = self.private.public_key()
        return VerifierKey(self.name, _key_hash(self.name, public.public_bytes(Encoding.Raw, PublicFormat.Raw)), public)

    def __str__(self) -> str:
        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        encoded = base64.b64encode(bytes([ED25519]) + seed).decode()
        return f"{PRIVATE_PREFIX}{self.name}+{self.verifier.key_hash:08x}+{encoded}"

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def write(self, path: Path) -> None:
        """Write the key to a new file only its owner can read (an existing file is never replaced)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{self}\n")


def sign_note(text: str, key: SigningKey) -> str:
    """The signed note of `text` (which must end in a newline)."""
    if not text.endswith("\n") or "\n\n" in text:
        raise NoteError("note text must end in a newline and contain no blank line")
    signature = key.verifier.key_hash.to_bytes(4, "big") + key.sign(text.encode())
    return f"{text}\n{SIGNATURE_DASH} {key.name} {base64.b64encode(signature).decode()}\n"


def open_note(note: str, trusted: Iterable[VerifierKey]) -> str:
    """The text of `note` if a trusted key signed it; NoteError otherwise.

    Signatures by keys not in `trusted` are ignored, as the format says; a signature line that
    names a trusted key but does not verify is an error, not a skip.
    """
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise NoteError("not a signed note: no signature block")
    text += "\n"
    keys = {(k.name, k.key_hash): k for k in trusted}
    verified = False
    for line in signatures[:-1].split("\n"):
        verified |= _check_signature_line(line, text, keys)
    if not verified:
        raise NoteError("no trusted key signed this note")
    return text


def _check_signature_line(line: str, text: str, keys: dict[tuple[str, int], VerifierKey]) -> bool:
    prefix = f"{SIGNATURE_DASH} "
    if not line.startswith(prefix) or line.count(" ") != 2:
        raise NoteError(f"malformed signature line {line!r}")
    name, encoded = line[len(prefix):].split(" ")
    raw = _b64decode(encoded, "signature")
    if len(raw) < 5:
        raise NoteError("signature too short")
    key = keys.get((name, int.from_bytes(raw[:4], "big")))
    if key is None:
        return False
    if not key.verify(raw[4:], text.encode()):
        raise NoteError(f"signature by {name} does not verify")
    return True

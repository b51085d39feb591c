"""Audit checkpoints: the text of a C2SP `tlog-checkpoint`, with toolbus's extension lines.

```
<log id>                                   origin
<tree size>
<base64 Merkle root>
seq <last AUDIT stream sequence in the tree>
time <epoch ms>
chain <chain id> <chain seq> <base64 head hash> <writer verifier key>   (one per chain)
```
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from shared.audit.notes import NoteError, SigningKey, VerifierKey, open_note, sign_note


@dataclass(frozen=True)
class ChainHead:
    """The newest record of one chain inside a checkpoint's tree, and the key that signs it."""

    chain_id: str
    chain_seq: int
    head: bytes
    writer_key: str  # the writer's verifier key, note `vkey` form


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement: the first `size` records of the log have Merkle root `root`."""

    log_id: str
    size: int
    root: bytes
    last_seq: int  # AUDIT stream sequence of the tree's last leaf (0 for an empty tree)
    time_ms: int
    chains: tuple[ChainHead, ...] = field(default=())

    def text(self) -> str:
        """The note text that is signed."""
        lines = [self.log_id, str(self.size), base64.b64encode(self.root).decode(),
                 f"seq {self.last_seq}", f"time {self.time_ms}"]
        lines += [f"chain {c.chain_id} {c.chain_seq} {base64.b64encode(c.head).decode()} {c.writer_key}"
                  for c in sorted(self.chains, key=lambda c: c.chain_id)]
        return "\n".join(lines) + "\n"

    def sign(self, key: SigningKey) -> str:
        """The signed note."""
        return sign_note(self.text(), key)

    @classmethod
    def parse_text(cls, text: str) -> Checkpoint:
        """Read a checkpoint's text; NoteError when it is not one."""
        lines = text.rstrip("\n").split("\n")
        if len(lines) < 5:
            raise NoteError("a checkpoint has at least 5 lines")
        try:
            return cls(log_id=lines[0], size=int(lines[1]), root=base64.b64decode(lines[2], validate=True),
                       last_seq=_field(lines[3], "seq"), time_ms=_field(lines[4], "time"),
                       chains=tuple(_chain(line) for line in lines[5:]))
        except (ValueError, IndexError) as error:
            raise NoteError(f"malformed checkpoint: {error}") from error

    @classmethod
    def open(cls, note: str, log_key: VerifierKey) -> Checkpoint:
        """Check the note's signature by the log key, then read it."""
        return cls.parse_text(open_note(note, [log_key]))


def _field(line: str, name: str) -> int:
    key, _, value = line.partition(" ")
    if key != name:
        raise ValueError(f"expected a `{name}` line, got {line!r}")
    return int(value)


def _chain(line: str) -> ChainHead:
    parts = line.split(" ")
    if len(parts) != 5 or parts[0] != "chain":
        raise ValueError(f"expected `chain <id> <seq> <head> <key>`, got {line!r}")
    return ChainHead(parts[1], int(parts[2]), base64.b64decode(parts[3], validate=True), parts[4])

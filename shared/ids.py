"""Call ids: UUIDv7 (RFC 9562), time-ordered so streams and logs sort by creation."""

from __future__ import annotations

import os
import time
import uuid


def new_call_id() -> str:
    """A fresh UUIDv7: 48-bit Unix milliseconds, version 7, variant 10, 74 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))

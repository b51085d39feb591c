"""Encoding of internal messages: pydantic models as msgpack, MCP payloads as JSON."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


def pack(model: BaseModel) -> bytes:
    """Encode a contract model as msgpack (its JSON-mode dump, so any language can read it)."""
    packed: bytes = msgpack.packb(model.model_dump(mode="json", by_alias=True), use_bin_type=True)
    return packed


def unpack(model_type: type[ModelT], data: bytes) -> ModelT:
    """Decode msgpack bytes into a contract model, validating every field."""
    return model_type.model_validate(msgpack.unpackb(data, raw=False))


def dump_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, the form MCP payloads travel in."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dump_model_json(model: BaseModel) -> bytes:
    """A contract model as compact JSON, omitting null members (JSON-RPC style)."""
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()

"""Entries of the `toolbus-registry` KV bucket and the runtime file (JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ToolSpec(BaseModel):
    """A backend tool as published by the executor that serves it (KV key `tools.<public name>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public_name: str
    server: str
    pool: str
    tool: str = Field(description="Name as the backend knows it.")
    title: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="The backend's JSON Schema for arguments.")
    output_schema: dict[str, Any] | None = None
    annotations: dict[str, Any] | None = None
    registered_at_ms: int


class ServiceEndpoint(BaseModel):
    """A process `toolbus up` started and where its health endpoints listen."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pid: int
    http_url: str | None = None


class RuntimeInfo(BaseModel):
    """`<data-dir>/runtime.json`: written by `toolbus up` once everything is ready."""

    model_config = ConfigDict(extra="forbid")

    nats_url: str
    redis_url: str
    gateway_url: str | None = None
    pid: int
    prefix: str
    services: list[ServiceEndpoint] = Field(default_factory=list)

"""Entries of the `toolbus-registry` KV bucket and the runtime file (JSON)."""

from __future__ import annotations

from enum import StrEnum
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


class CatalogKind(StrEnum):
    """What else than tools a backend offers, each listed and used through the bus."""

    PROMPT = "prompt"
    RESOURCE = "resource"
    TEMPLATE = "template"  # a resource template: reads of URIs it matches go to its server


class CatalogEntry(BaseModel):
    """A backend's prompt, resource or resource template, published by the executor that serves it
    (KV key `<kind>s.<server>.<digest>`; see `shared.registry.catalog_key`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: CatalogKind
    public_name: str = Field(description="`<prefix>__<name>` like a tool's: what roles allow or deny.")
    server: str
    pool: str
    name: str = Field(description="Name as the backend knows it.")
    uri: str | None = Field(default=None, description="A resource's URI or a template's URI template, unchanged.")
    definition: dict[str, Any] = Field(
        description="The backend's MCP object (Prompt, Resource or ResourceTemplate) as its list shows it, "
        "with `name` replaced by the public name."
    )
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


class BreakerView(BaseModel):
    """A backend's shared circuit breaker as one worker last read it."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(description="closed, open or half_open.")
    failures: int = Field(description="Consecutive failures counted so far.")
    retry_after_ms: int = Field(description="Until the next trial call, when open.")


class WorkerBeat(BaseModel):
    """A worker's heartbeat in KV bucket `toolbus-workers` (key `<pool>.<instance>`); it expires when beats stop."""

    model_config = ConfigDict(extra="forbid")

    instance: str
    pool: str
    pid: int
    concurrency: int
    in_flight: int
    backends: dict[str, bool] = Field(description="Backend name → connected.")
    breakers: dict[str, BreakerView] = Field(default_factory=dict, description="Backend name → shared breaker.")
    started_at_ms: int
    beat_at_ms: int


class ScaleRequest(BaseModel):
    """`toolbus scale POOL N`, sent to `toolbus.mesh.scale` (JSON)."""

    model_config = ConfigDict(extra="forbid")

    pool: str
    workers: int = Field(ge=0, le=64)


class ScaleReply(BaseModel):
    """The mesh's answer: how many workers the pool had and has now, or why it refused."""

    model_config = ConfigDict(extra="forbid")

    pool: str
    before: int
    after: int
    error: str | None = None

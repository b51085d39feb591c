"""A backend's tools, prompts, resources and templates as the registry publishes them.

Names are namespaced as tools are (`<prefix>__<name>`, or bare with `prefix: ""`), so roles
allow and deny prompts and resources with the same globs. URIs stay the backend's own: they
are identifiers the backend's content refers to (embedded resources, resource links), and
rewriting them would break exactly what a client follows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mcp_types import Prompt, Resource, ResourceTemplate, Tool

from services.executor.backends import Catalog
from shared.config import Config
from shared.contracts import CatalogEntry, CatalogKind, ToolSpec
from shared.outcomes import now_ms


def tool_spec(config: Config, server: str, pool: str, tool: Tool) -> ToolSpec:
    """A backend tool under its public name, with the backend's own metadata."""
    annotations = tool.annotations.model_dump(mode="json", by_alias=True, exclude_none=True) \
        if tool.annotations else None
    return ToolSpec(
        public_name=config.public_name(server, tool.name), server=server, pool=pool, tool=tool.name,
        title=tool.title, description=tool.description, input_schema=tool.input_schema,
        output_schema=tool.output_schema, annotations=annotations, registered_at_ms=now_ms(),
    )


def catalog_entries(config: Config, server: str, pool: str, catalog: Catalog) -> Iterator[CatalogEntry]:
    """Every prompt, resource and template of one backend as registry entries."""
    items: list[tuple[CatalogKind, Prompt | Resource | ResourceTemplate, str | None]] = [
        *((CatalogKind.PROMPT, prompt, None) for prompt in catalog.prompts),
        *((CatalogKind.RESOURCE, resource, resource.uri) for resource in catalog.resources),
        *((CatalogKind.TEMPLATE, template, template.uri_template) for template in catalog.templates),
    ]
    for kind, item, uri in items:
        public_name = config.public_name(server, item.name)
        definition: dict[str, Any] = item.model_dump(mode="json", by_alias=True, exclude_none=True)
        definition["name"] = public_name
        yield CatalogEntry(kind=kind, public_name=public_name, server=server, pool=pool, name=item.name, uri=uri,
                           definition=definition, registered_at_ms=now_ms())

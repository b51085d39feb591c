"""Finding a backend's prompt or resource by what a request names: the router routes by it, the
gateway lists from it. Both keep one `CatalogIndex` current from the registry watch.

A resource is found by its exact URI first, then by the first resource template (in public
name order, so every replica picks the same) whose URI template matches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.contracts import CatalogEntry, CatalogKind

# RFC 6570 expressions: `{var}` matches one path segment, `{+var}` / `{#var}` anything, and
# `{/var}`, `{?var,…}` style operators an optional tail. Enough to route a read to its server.
_EXPRESSION = re.compile(r"\{([+#./;?&]?)([^}]*)\}")
_OPERATOR_PATTERN = {"": r"[^/?#]+", "+": r".+", "#": r".*", ".": r"(?:\.[^/?#]*)?", "/": r"(?:/[^?#]*)?",
                     ";": r"(?:;[^/?#]*)?", "?": r"(?:\?[^#]*)?", "&": r"(?:&[^#]*)?"}


def template_pattern(uri_template: str) -> re.Pattern[str]:
    """A regex matching the URIs an RFC 6570 template can expand to (literal parts exactly)."""
    parts: list[str] = []
    position = 0
    for expression in _EXPRESSION.finditer(uri_template):
        parts.append(re.escape(uri_template[position:expression.start()]))
        parts.append(_OPERATOR_PATTERN[expression.group(1)])
        position = expression.end()
    parts.append(re.escape(uri_template[position:]))
    return re.compile("".join(parts))


@dataclass
class CatalogIndex:
    """Registered prompts, resources and templates, by registry key and by what requests name."""

    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    _patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: dict[str, CatalogEntry]) -> CatalogIndex:
        index = cls()
        for key, entry in entries.items():
            index.put(key, entry)
        return index

    def put(self, key: str, entry: CatalogEntry) -> None:
        self.entries[key] = entry
        if entry.kind is CatalogKind.TEMPLATE and entry.uri is not None:
            self._patterns[key] = template_pattern(entry.uri)

    def remove(self, key: str) -> None:
        self.entries.pop(key, None)
        self._patterns.pop(key, None)

    def of_kind(self, kind: CatalogKind) -> list[CatalogEntry]:
        """Entries of one kind in public name order (a stable listing)."""
        return sorted((e for e in self.entries.values() if e.kind is kind), key=lambda e: (e.public_name, e.uri))

    def prompt(self, public_name: str) -> CatalogEntry | None:
        found = (e for e in self.entries.values() if e.kind is CatalogKind.PROMPT and e.public_name == public_name)
        return next(found, None)

    def resource(self, uri: str) -> CatalogEntry | None:
        """The resource with this URI, else the template that matches it, else None."""
        exact = [e for e in self.entries.values() if e.kind is CatalogKind.RESOURCE and e.uri == uri]
        if exact:
            return min(exact, key=lambda e: e.public_name)  # two servers with one URI: the same pick everywhere
        templates = ((key, e) for key, e in self.entries.items() if e.kind is CatalogKind.TEMPLATE)
        matching = (e for key, e in templates if self._patterns[key].fullmatch(uri))
        return min(matching, key=lambda e: e.public_name, default=None)


"""Finding the backend of a resource read or prompt get: exact URIs, RFC 6570 templates, stable picks."""

from __future__ import annotations

import pytest

from shared.catalog import CatalogIndex, template_pattern
from shared.contracts import CatalogEntry, CatalogKind


def entry(kind: CatalogKind, public_name: str, uri: str | None = None, server: str = "demo") -> CatalogEntry:
    return CatalogEntry(kind=kind, public_name=public_name, server=server, pool="default",
                        name=public_name.rsplit("__", maxsplit=1)[-1], uri=uri, definition={"name": public_name},
                        registered_at_ms=1)


@pytest.mark.parametrize(("template", "uri", "matches"), [
    ("demo://echo/{text}", "demo://echo/hello", True),
    ("demo://echo/{text}", "demo://echo/a/b", False),  # a simple expression is one path segment
    ("demo://echo/{text}", "demo://echo/", False),
    ("file:///{+path}", "file:///etc/hosts", True),  # reserved expansion spans segments
    ("test://template/{id}/data", "test://template/42/data", True),
    ("test://template/{id}/data", "test://template/42/datum", False),
    ("weather://{city}{?units}", "weather://paris?units=metric", True),
    ("weather://{city}{?units}", "weather://paris", True),
    ("a.b://{x}", "aXb://y", False),  # literal parts are matched literally, dots included
])
def test_template_patterns_match_what_the_template_expands_to(template: str, uri: str, matches: bool) -> None:
    assert bool(template_pattern(template).fullmatch(uri)) is matches


def test_an_exact_resource_wins_over_a_matching_template() -> None:
    index = CatalogIndex.of({
        "t": entry(CatalogKind.TEMPLATE, "demo__any", "demo://{name}"),
        "r": entry(CatalogKind.RESOURCE, "demo__readme", "demo://readme"),
    })
    found = index.resource("demo://readme")
    assert found is not None and found.public_name == "demo__readme"
    templated = index.resource("demo://other")
    assert templated is not None and templated.public_name == "demo__any"
    assert index.resource("nowhere://x") is None


def test_two_servers_offering_one_uri_resolve_the_same_way_everywhere() -> None:
    """Whatever order the registry delivered them in, every router and gateway picks the same one."""
    first = entry(CatalogKind.RESOURCE, "b__readme", "shared://readme", server="b")
    second = entry(CatalogKind.RESOURCE, "a__readme", "shared://readme", server="a")
    one_way = CatalogIndex.of({"1": first, "2": second}).resource("shared://readme")
    other_way = CatalogIndex.of({"2": second, "1": first}).resource("shared://readme")
    assert one_way == other_way and one_way is not None and one_way.server == "a"


def test_removed_entries_are_no_longer_found() -> None:
    index = CatalogIndex.of({"p": entry(CatalogKind.PROMPT, "demo__review"),
                             "t": entry(CatalogKind.TEMPLATE, "demo__echo", "demo://echo/{x}")})
    assert index.prompt("demo__review") is not None
    index.remove("p")
    index.remove("t")
    assert index.prompt("demo__review") is None
    assert index.resource("demo://echo/y") is None
    assert index.of_kind(CatalogKind.PROMPT) == []

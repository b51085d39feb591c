"""The gateway's resource-subscription rules (`services/gateway/subscriptions.py`): which URIs a
caller may watch, and how reports of one change from several workers become one notification."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.subscriptions import CoalescedUpdates, watchable_resource
from shared.catalog import CatalogIndex
from shared.config import Principal, Role, hash_api_key
from shared.contracts import CatalogEntry, CatalogKind
from shared.errors import Forbidden, InvalidArguments

pytestmark = pytest.mark.unit

WINDOW_S = 0.05
ROLES = {"reader": Role(allow=["demo__*"], deny=["demo__secret", "demo__hidden_template"])}
READER = Principal(name="reader", key_sha256=hash_api_key("reader-key"), roles=["reader"])


def entry(kind: CatalogKind, public_name: str, uri: str) -> CatalogEntry:
    return CatalogEntry(kind=kind, public_name=public_name, server="demo", pool="default",
                        name=public_name.removeprefix("demo__"), uri=uri, definition={"name": public_name},
                        registered_at_ms=1)


CATALOG = CatalogIndex.of({
    "notes": entry(CatalogKind.RESOURCE, "demo__notes", "demo://notes"),
    "secret": entry(CatalogKind.RESOURCE, "demo__secret", "demo://secret"),
    "echo": entry(CatalogKind.TEMPLATE, "demo__echo", "demo://echo/{text}"),
    "hidden": entry(CatalogKind.TEMPLATE, "demo__hidden_template", "demo://hidden/{x}"),
})


# --- which URIs may be watched ------------------------------------------------------------------


def test_a_listed_resource_the_role_allows_can_be_watched() -> None:
    assert watchable_resource(CATALOG, READER, ROLES, "demo://notes").public_name == "demo__notes"


def test_a_listed_resource_the_role_denies_is_forbidden() -> None:
    with pytest.raises(Forbidden):
        watchable_resource(CATALOG, READER, ROLES, "demo://secret")


def test_a_uri_only_a_template_matches_cannot_be_watched() -> None:
    """Readable through the template, but no executor watches it: refused as invalid, saying why."""
    with pytest.raises(InvalidArguments, match="only listed resources can be watched"):
        watchable_resource(CATALOG, READER, ROLES, "demo://echo/hello")


def test_a_denied_template_uri_is_forbidden_as_a_read_of_it_is() -> None:
    """Access is judged first, as the router judges a read, so a refusal never tells more than a read's."""
    with pytest.raises(Forbidden):
        watchable_resource(CATALOG, READER, ROLES, "demo://hidden/x")


def test_a_uri_nobody_serves_cannot_be_watched() -> None:
    with pytest.raises(InvalidArguments, match="no server lists"):
        watchable_resource(CATALOG, READER, ROLES, "nowhere://nothing")


# --- one notification per change ----------------------------------------------------------------


class Deliveries:
    """What a `CoalescedUpdates` delivered, and when (loop time)."""

    def __init__(self) -> None:
        self.uris: list[str] = []
        self.at: list[float] = []
        self._changed = asyncio.Event()

    def deliver(self, uri: str) -> None:
        self.uris.append(uri)
        self.at.append(asyncio.get_running_loop().time())
        self._changed.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.uris) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_reports_of_one_uri_within_the_window_are_delivered_once() -> None:
    """Three workers report the same change: one delivery; another URI gets its own."""
    delivered = Deliveries()
    updates = CoalescedUpdates(WINDOW_S, delivered.deliver)
    for uri in ("demo://notes", "demo://notes", "demo://other", "demo://notes"):
        updates.report(uri)
    await delivered.until(2)
    assert sorted(delivered.uris) == ["demo://notes", "demo://other"]  # no timer is left to add a third


async def test_delivery_waits_for_the_window_to_end() -> None:
    """The notification goes out at the window's end, so every report within it happened before it."""
    delivered = Deliveries()
    updates = CoalescedUpdates(WINDOW_S, delivered.deliver)
    reported_at = asyncio.get_running_loop().time()
    updates.report("demo://notes")
    await delivered.until(1)
    assert delivered.at[0] - reported_at >= WINDOW_S * 0.9  # the loop's timer resolution, nothing more


async def test_a_report_after_a_delivery_is_delivered_again() -> None:
    """A change after the notification is news: it is never swallowed by the one before."""
    delivered = Deliveries()
    updates = CoalescedUpdates(WINDOW_S, delivered.deliver)
    updates.report("demo://notes")
    await delivered.until(1)
    updates.report("demo://notes")
    await delivered.until(2)
    assert delivered.uris == ["demo://notes", "demo://notes"]


async def test_closing_drops_what_is_still_waiting() -> None:
    """A stopping gateway delivers nothing more: waiting reports are dropped with their timers."""
    delivered = Deliveries()
    updates = CoalescedUpdates(WINDOW_S, delivered.deliver)
    updates.report("demo://notes")
    updates.close()
    later = CoalescedUpdates(WINDOW_S, delivered.deliver)  # a probe that does deliver, to wait on
    later.report("demo://probe")
    await delivered.until(1)
    assert delivered.uris == ["demo://probe"]

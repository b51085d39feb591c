"""The public API of `shared` is exactly what `__all__` lists, and every name in it exists."""

from __future__ import annotations

import pytest

import shared

pytestmark = pytest.mark.unit

EXPECTED = {
    "CallFailed", "CallResult", "Config", "ConfigError", "Header", "Stream", "Subjects", "ToolbusClient",
    "ToolbusError", "ToolbusUnavailable", "load_config", "new_call_id",
    # the context store's SDK (issue 6)
    "BlockType", "ContextClient", "ContextRefused", "ContextUnavailable", "NewBlock",
}


def test_all_lists_the_public_api() -> None:
    """`shared.__all__` is the agreed public API: adding or removing a name is a deliberate change."""
    assert set(shared.__all__) == EXPECTED


def test_every_exported_name_is_importable() -> None:
    """Each name in `__all__` is an attribute of the package whose module is inside `shared`."""
    for name in shared.__all__:
        member = getattr(shared, name)
        assert getattr(member, "__module__", "shared").startswith("shared"), name

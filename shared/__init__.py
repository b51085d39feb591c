"""toolbus's shared package: contracts, bus wiring, config, client SDK, embedded runtime.

It holds what two or more services (or a producer) need, and no service logic.
"""

from shared.client import CallResult, ToolbusClient, ToolbusUnavailable
from shared.config import Config, ConfigError, load_config
from shared.errors import CallFailed, ToolbusError
from shared.ids import new_call_id
from shared.subjects import Header, Stream, Subjects

__all__ = [
    "CallFailed",
    "CallResult",
    "Config",
    "ConfigError",
    "Header",
    "Stream",
    "Subjects",
    "ToolbusClient",
    "ToolbusError",
    "ToolbusUnavailable",
    "load_config",
    "new_call_id",
]

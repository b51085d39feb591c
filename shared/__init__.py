"""toolbus's shared package: contracts, bus wiring, config, client SDK, embedded runtime.

It holds what two or more services (or a producer) need, and no service logic.
"""

from shared.client import CallResult, ToolbusClient, ToolbusUnavailable
from shared.config import Config, ConfigError, load_config
from shared.context_client import ContextClient, ContextUnavailable
from shared.contracts.context import BlockType, NewBlock
from shared.errors import CallFailed, ContextRefused, ToolbusError
from shared.ids import new_call_id
from shared.subjects import Header, Stream, Subjects

__all__ = [
    "BlockType",
    "CallFailed",
    "CallResult",
    "Config",
    "ConfigError",
    "ContextClient",
    "ContextRefused",
    "ContextUnavailable",
    "Header",
    "NewBlock",
    "Stream",
    "Subjects",
    "ToolbusClient",
    "ToolbusError",
    "ToolbusUnavailable",
    "load_config",
    "new_call_id",
]

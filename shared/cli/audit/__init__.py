"""`toolbus audit keygen|tail|query|export|report|verify|prove|verify-proof`: read, check and prove the audit log.

Records are read from stream AUDIT in stream order by an ephemeral ordered consumer (nothing is left on
the server). Filters apply to the record body; times are the record's `ts` (when the writer appended it).
`verify` replays the whole log against its signed checkpoints (`shared/audit/verifier.py`); `prove`
writes an inclusion proof that `verify-proof` checks offline, without NATS. The config (`--config`,
else `./toolbus.yaml` if it exists, else defaults) gives only `audit.log_id`, the verifier's skew and
staleness, and the log key's path; the bus and prefix are found as for every command (`resolve_bus`).
"""

from shared.cli.audit import reading, report, verifying
from shared.cli.audit.common import app

__all__ = ["app", "reading", "report", "verifying"]

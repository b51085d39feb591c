"""`python -m services.audit`: run one audit writer replica (its own chain) and checkpointer."""

import os
from pathlib import Path

from services.audit.app import AuditService, AuditSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("audit", "Record every bus event in a hash-chained, signed audit log.")
    parser.add_argument("--signing-key", type=Path, default=os.environ.get("TOOLBUS_AUDIT_KEY"),
                        required="TOOLBUS_AUDIT_KEY" not in os.environ, help="log key file (toolbus audit keygen)")
    parser.add_argument("--key-dir", type=Path, default=None, help="keeps this writer's key across restarts")
    parser.add_argument("--ack-wait-s", type=float, default=30.0, help="redelivery delay of a dead writer's events")
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = AuditSettings(args.nats_url, namespace.signing_key, args.prefix, args.instance, namespace.key_dir,
                             ack_wait_s=namespace.ack_wait_s)
    run_service(AuditService(settings), args.http)


main()

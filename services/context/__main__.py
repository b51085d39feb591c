"""`python -m services.context`: run one replica of the context store."""

import os

from services.context.app import ContextService, ContextSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("context", "Keep agents' context sessions: append, render to a budget, hand off.")
    parser.add_argument("--redis-url", default=os.environ.get("TOOLBUS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = ContextSettings(args.nats_url, args.prefix, args.instance, namespace.redis_url)
    run_service(ContextService(settings), args.http)


main()

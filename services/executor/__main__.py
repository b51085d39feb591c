"""`python -m services.executor --pool NAME`: run one worker process of a pool."""

import os

from services.executor.app import ExecutorService, ExecutorSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("executor", "Run routed tool calls on warm MCP sessions to a pool's backends.")
    parser.add_argument("--pool", default="default", help="the pool this worker serves")
    parser.add_argument("--redis-url", default=os.environ.get("TOOLBUS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = ExecutorSettings(args.nats_url, namespace.pool, args.prefix, args.instance, namespace.redis_url)
    run_service(ExecutorService(settings), args.http)


main()

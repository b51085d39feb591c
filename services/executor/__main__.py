"""`python -m services.executor --pool NAME`: run one worker process of a pool."""

from services.executor.app import ExecutorService, ExecutorSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("executor", "Run routed tool calls on warm MCP sessions to a pool's backends.")
    parser.add_argument("--pool", default="default", help="the pool this worker serves")
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = ExecutorSettings(args.nats_url, namespace.pool, args.prefix, args.instance)
    run_service(ExecutorService(settings), args.http)


main()

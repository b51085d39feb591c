"""`python -m services.router`: run one router replica."""

from services.router.app import RouterService, RouterSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("router", "Authenticate, authorize, validate and route tool calls.")
    parser.add_argument("--max-in-flight", type=int, default=256)
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = RouterSettings(args.nats_url, args.prefix, args.instance, namespace.max_in_flight)
    run_service(RouterService(settings), args.http)


main()

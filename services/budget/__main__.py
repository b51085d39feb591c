"""`python -m services.budget`: run one replica of the budget accountant."""

import os

from services.budget.app import BudgetService, BudgetSettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("budget", "Hold, settle and release the cost of tool calls against budgets.")
    parser.add_argument("--redis-url", default=os.environ.get("TOOLBUS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = BudgetSettings(args.nats_url, args.prefix, args.instance, namespace.redis_url)
    run_service(BudgetService(settings), args.http)


main()

"""`toolbus budget show|set|rebuild`: read spend against limits, change limits at runtime, rebuild counters.

Every command is one request to the budget accountant (`<prefix>.budget.<verb>`). Money crosses this
module as integer micro-USD and is shown or parsed through `Decimal`, never a float.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.budget_client import AccountantUnavailable, BudgetClient
from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl, connect_once, resolve_bus
from shared.config import BUDGET_SCOPE_KINDS
from shared.contracts import AdminReply, ScopeBudget, SetLimitRequest, StatusReply, StatusRequest
from shared.contracts.budget import Window
from shared.subjects import Subjects

T = TypeVar("T")
app = typer.Typer(help="Show spend against budgets, set limits at runtime, rebuild the counters.",
                  no_args_is_help=True)
console = Console(emoji=False)  # `user:x:total` must not become `user❌total`
errors = Console(stderr=True, emoji=False, soft_wrap=True)  # out of `--json` output; one line per message

EXIT_ERROR = 1  # no accountant answered, no such budget, or the accountant refused the change
EXIT_COUNTERS_LOST = 3  # the accountant's counters are gone until `toolbus budget rebuild`
MICROS_PER_USD = 1_000_000
MAX_USD_DIGITS = 13  # 10^13 USD and more exceed MAX_MICROS: refused before the decimal shift
MAX_MICROS = 2**63 - 1  # the largest signed 64-bit integer: what msgpack and Redis counters carry
REQUEST_TIMEOUT_S = 5.0
KINDS = "|".join(BUDGET_SCOPE_KINDS)

WindowOption = Annotated[Window, typer.Option("--window", help="The budget window the limit applies to.")]


def check_scope(scope: str | None) -> str | None:
    """`<org|team|project|user|key>:<name>`, as in the config's `budgets`."""
    if scope is None:
        return None
    kind, sep, name = scope.partition(":")
    if not sep or kind not in BUDGET_SCOPE_KINDS or not name:
        raise typer.BadParameter(f"scope must be '<{KINDS}>:<name>', e.g. user:alice; got {scope!r}")
    return scope


def parse_usd(text: str) -> int:
    """An exact amount of USD (`0.02`, `15`) as integer micro-USD; refuses fractions of a micro-USD."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise typer.BadParameter(f"not an amount of USD: {text!r}", param_hint="'--limit-usd'") from None
    if not amount.is_finite() or amount < 0:
        raise typer.BadParameter(f"must be a finite amount of USD >= 0, got {text!r}", param_hint="'--limit-usd'")
    if amount.adjusted() >= MAX_USD_DIGITS:
        raise typer.BadParameter(f"{text!r} is more than the largest limit, {usd(MAX_MICROS)}",
                                 param_hint="'--limit-usd'")
    with localcontext() as exact:
        exact.prec = len(amount.as_tuple().digits) + 7  # enough digits that the shift below never rounds
        micros = amount.scaleb(6)
    if micros != micros.to_integral_value():
        raise typer.BadParameter(f"{text!r} is not a whole number of micro-USD (at most 6 decimal places)",
                                 param_hint="'--limit-usd'")
    if micros > MAX_MICROS:
        raise typer.BadParameter(f"{text!r} is more than the largest limit, {usd(MAX_MICROS)}",
                                 param_hint="'--limit-usd'")
    return int(micros)


def parse_alerts(text: str | None) -> list[float]:
    """`0.8,0.95` as fractions of the limit, each in (0, 1]."""
    if text is None:
        return []
    fractions = []
    for part in text.split(","):
        try:
            fraction = float(part)
        except ValueError:
            raise typer.BadParameter(f"not a number: {part.strip()!r}", param_hint="'--alert-at'") from None
        if not 0 < fraction <= 1:
            raise typer.BadParameter(f"alert thresholds are fractions in (0, 1], got {part.strip()!r}",
                                     param_hint="'--alert-at'")
        fractions.append(fraction)
    return fractions


def usd(micros: int) -> str:
    """`$0.02`, `$1.00`, `$0.000001`: at least cents, and every micro-USD that is there."""
    amount = Decimal(micros) / MICROS_PER_USD  # exact: an int64 has far fewer than 28 digits
    exponent = amount.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    sign = "-" if amount < 0 else ""
    return f"{sign}${abs(amount):,.{places}f}"


@app.command("show")
def show(scope: Annotated[str | None, typer.Argument(help="One scope, e.g. user:alice (default: all).",
                                                     callback=check_scope)] = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the accountant's reply as JSON.")] = False,
         nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show each budget's limit, spend, holds and window, then spend per tool and model (exit 3: counters lost)."""
    reply = _run(nats_url, data_dir, lambda budget: budget.status(StatusRequest(scope=scope)))
    if as_json:
        print(reply.model_dump_json(indent=2))
    elif reply.budgets or scope is None:
        print_budgets(reply)
    if reply.error:
        errors.print(f"[red]the budget service reported: {escape(reply.error)}[/red]")
    if scope is not None and not reply.budgets:
        errors.print(f"[red]no budget for {escape(scope)}: neither the config nor `toolbus budget set` "
                     f"gives it a limit[/red]")
    if not reply.counters_ok:
        errors.print("[bold red]warning: the budget counters were lost (Redis restarted without its data?): "
                     "every budgeted call is refused, and the amounts shown may be incomplete, until "
                     "`toolbus budget rebuild` is run[/bold red]")
        raise typer.Exit(EXIT_COUNTERS_LOST)
    if reply.error or (scope is not None and not reply.budgets):
        raise typer.Exit(EXIT_ERROR)


@app.command("set")
def set_limit(scope: Annotated[str, typer.Argument(help="The scope, e.g. user:alice or team:data.",
                                                   callback=check_scope)],
              limit_usd: Annotated[str | None, typer.Option("--limit-usd", help="The new limit in USD, "
                                                            "e.g. 0.02 (exact to the micro-USD).")] = None,
              remove: Annotated[bool, typer.Option("--remove", help="Drop the runtime limit of this "
                                                   "window.")] = False,
              window: WindowOption = "day",
              alert_at: Annotated[str | None, typer.Option("--alert-at", help="Comma-separated fractions of "
                                                           "the limit that raise an alert, e.g. 0.8,0.95.")] = None,
              nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Set a scope's spend limit at runtime (it overrides the config), or remove it with --remove."""
    if remove == (limit_usd is not None):
        raise typer.BadParameter("pass exactly one of --limit-usd and --remove")
    if remove and alert_at is not None:
        raise typer.BadParameter("only with --limit-usd, not with --remove", param_hint="'--alert-at'")
    request = SetLimitRequest(scope=scope, window=window, alert_at=parse_alerts(alert_at),
                              limit_micros=None if limit_usd is None else parse_usd(limit_usd))
    reply = _run(nats_url, data_dir, lambda budget: budget.set_limit(request))
    _print_admin(reply, reply.message if request.limit_micros is None
                 else f"{reply.message} ({usd(request.limit_micros)})")


@app.command("rebuild")
def rebuild(nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Rebuild every spend counter and open hold in Redis from the budget ledger (after Redis lost them)."""
    reply = _run(nats_url, data_dir, lambda budget: budget.rebuild())
    _print_admin(reply, f"rebuilt the budget counters from the ledger: {reply.calls} calls folded, spent "
                        f"{usd(reply.spent_micros)} and held {usd(reply.held_micros)} (summed over every budget "
                        "window a call counts against)")


def _print_admin(reply: AdminReply, success: str) -> None:
    if not reply.ok:
        errors.print(f"[red]{escape(reply.message)}[/red]")
        raise typer.Exit(EXIT_ERROR)
    console.print(escape(success), highlight=False, soft_wrap=True)


def print_budgets(reply: StatusReply) -> None:
    """The budgets table and per-tool/per-model spend lines (`budget show`, `status`)."""
    if not reply.budgets:
        console.print("no budgets: none in the config and none set at runtime")
        return
    table = Table(title=f"{len(reply.budgets)} budgets", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for header in ("scope", "window", "window key", "limit", "spent", "held", "remaining", "overrun", "resets at",
                   "source", "rpm/tpm"):
        table.add_column(header, overflow="fold")  # a narrow terminal wraps amounts, never cuts them short
    for budget in reply.budgets:
        table.add_row(*(escape(cell) for cell in _row(budget)))
    console.print(table, highlight=False)
    for budget in reply.budgets:
        for line in _breakdown(budget):
            console.print(escape(line), highlight=False, soft_wrap=True)


def _row(budget: ScopeBudget) -> list[str]:
    rates = f"{budget.rpm or '-'}/{budget.tpm or '-'}"
    if budget.window is None:  # rate limits only: no spend is counted against the scope
        return [budget.scope, *["-"] * 8, budget.source, rates]
    return [budget.scope, budget.window, budget.window_key or "-", _maybe_usd(budget.limit_micros),
            usd(budget.spent_micros), usd(budget.held_micros), _maybe_usd(budget.remaining_micros),
            usd(budget.overrun_micros), _resets_at(budget), budget.source, rates]


def _breakdown(budget: ScopeBudget) -> list[str]:
    where = f"{budget.scope}:{budget.window_key}"  # the bucket name events use, e.g. user:alice:d20261121
    return [f"{where} spent by {what}: " + ", ".join(f"{name} {usd(micros)}" for name, micros in sorted(spend.items()))
            for what, spend in (("tool", budget.by_tool), ("model", budget.by_model)) if spend]


def _maybe_usd(micros: int | None) -> str:
    return "-" if micros is None else usd(micros)


def _resets_at(budget: ScopeBudget) -> str:
    if budget.resets_at_ms is None:
        return "never"
    return datetime.fromtimestamp(budget.resets_at_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(nats_url: str | None, data_dir: Path, action: Callable[[BudgetClient], Awaitable[T]]) -> T:
    """Run one request against the budget accountant, then disconnect; no accountant exits 1."""
    url, prefix = resolve_bus(nats_url, data_dir)

    async def run() -> T:
        nc = await connect_once(url)
        try:
            return await action(BudgetClient(nc, Subjects(prefix), REQUEST_TIMEOUT_S))
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except AccountantUnavailable as error:
        errors.print(f"[red]no budget service answered on {escape(Subjects(prefix).budget('*'))} at "
                     f"{escape(url)}: {escape(str(error))} (is the mesh up, with accounting enabled?)[/red]")
        raise typer.Exit(EXIT_ERROR) from None

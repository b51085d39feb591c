"""`toolbus audit report`: calls by outcome, actor and tool; refusals; high-risk calls; spend."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from shared.cli.audit.common import (
    BUDGET_EXCEEDED,
    FINAL_KINDS,
    REJECTED,
    SETTLED,
    ConfigOption,
    Filters,
    JsonOption,
    Record,
    SinceOption,
    UntilOption,
    app,
    console,
    parse_time,
    target,
)
from shared.cli.audit.reading import filtered
from shared.cli.budget import usd
from shared.cli.common import DEFAULT_DATA_DIR, DataDir, NatsUrl
from shared.contracts.audit import HIGH_RISK, Outcome

# --- report --------------------------------------------------------------------------------------------


@dataclass
class CallFacts:
    """What the records of one call (or one record without a call id) say about it."""

    is_call: bool = False
    actor: str | None = None
    tool: str | None = None
    outcome: str = Outcome.UNKNOWN.value
    rejected: str | None = None
    budget_refused: str | None = None
    risk: int | None = None
    cost_micros: int | None = None

    def absorb(self, record: Record) -> None:
        event = record.envelope.body.event
        self.is_call |= event.kind.startswith("call.")
        self.tool = record.tool or self.tool
        if event.actor.type == "principal":
            self.actor = event.actor.id
        if event.kind in FINAL_KINDS:
            self.outcome = event.outcome.value
        if event.kind == REJECTED:
            self.rejected = event.reason or "unknown"
        if event.kind == BUDGET_EXCEEDED:
            self.budget_refused = event.reason or "unknown"
        if event.risk is not None:
            self.risk = max(self.risk or 0, event.risk)
        if event.kind == SETTLED:
            self.cost_micros = event.cost_micros


def summarize(records: list[Record]) -> dict[str, Any]:
    """Counts of calls by outcome, actor and tool, refusals by reason, high-risk calls, and spend (micro-USD).

    Facts are gathered per call id, so a call counts once however many records it has: a refusal is the
    call's `call.rejected` reason (else its `budget.exceeded` one), its spend the cost of its newest
    `budget.settled` record (settles are idempotent), and its actor the principal of its records.
    """
    calls: dict[str, CallFacts] = {}
    for record in records:
        event = record.envelope.body.event
        calls.setdefault(event.call_id or f"#{record.seq}", CallFacts()).absorb(record)
    real = [c for c in calls.values() if c.is_call]
    refusals = Counter(c.rejected or c.budget_refused for c in calls.values() if c.rejected or c.budget_refused)
    spent = [c for c in calls.values() if c.cost_micros is not None]
    return {
        "records": len(records), "calls": len(real),
        "by_outcome": dict(Counter(c.outcome for c in real)), "by_actor": dict(Counter(c.actor or "-" for c in real)),
        "by_tool": dict(Counter(c.tool or "-" for c in real)), "refusals": dict(refusals),
        "high_risk": [{"call_id": call_id, "actor": c.actor, "tool": c.tool, "risk": c.risk}
                      for call_id, c in calls.items() if c.risk is not None and c.risk >= HIGH_RISK],
        "spend_micros": {"total": sum(c.cost_micros or 0 for c in spent),
                         "by_actor": _sums((c.actor or "-", c.cost_micros or 0) for c in spent),
                         "by_tool": _sums((c.tool or "-", c.cost_micros or 0) for c in spent)},
    }


def _sums(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for name, amount in pairs:
        totals[name] += amount
    return dict(totals)


@app.command("report")
def report(since: SinceOption = None, until: UntilOption = None, as_json: JsonOption = False,
           config_path: ConfigOption = None, nats_url: NatsUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Summarize calls by outcome, actor and tool; refusals by reason; high-risk calls (risk >= 50); spend."""
    filters = Filters(since_ms=parse_time(since, "--since"), until_ms=parse_time(until, "--until"))
    summary = {"since_ms": filters.since_ms, "until_ms": filters.until_ms,
               **summarize(filtered(target(config_path, nats_url, data_dir), filters))}
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    console.print(f"{summary['records']} records, {summary['calls']} calls")
    for header, counts in (("outcome", summary["by_outcome"]), ("actor", summary["by_actor"]),
                           ("tool", summary["by_tool"]), ("refusal reason", summary["refusals"])):
        console.print(counts_table(header, "calls", {k: str(v) for k, v in counts.items()}))
    risky = Table(f"high-risk call (risk >= {HIGH_RISK})", "actor", "tool", "risk", box=box.SIMPLE_HEAD)
    for row in summary["high_risk"]:
        risky.add_row(*(escape(str(row[k] or "-")) for k in ("call_id", "actor", "tool", "risk")))
    console.print(risky)
    spend = summary["spend_micros"]
    for what in ("actor", "tool"):
        table = counts_table(what, "spent", {k: usd(v) for k, v in spend[f"by_{what}"].items()})
        table.add_section()
        table.add_row("[bold]total[/bold]", f"[bold]{usd(spend['total'])}[/bold]")
        console.print(table)


def counts_table(header: str, column: str, values: dict[str, str]) -> Table:
    table = Table(header, column, box=box.SIMPLE_HEAD)
    for name, value in sorted(values.items()):
        table.add_row(escape(name), value)
    return table

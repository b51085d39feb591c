"""The `toolbus` command: run the mesh, call tools, inspect the registry, check config."""

from __future__ import annotations

import typer

from shared.cli import audit, budget, calls, config_cmd, ctx, demo, dlq, gateway, scale, status, up

app = typer.Typer(help="toolbus: MCP tool calls over NATS.", no_args_is_help=True, add_completion=False)
app.command("up")(up.up)
app.command("call")(calls.call)
app.command("tools")(calls.tools)
app.command("demo")(demo.demo)
app.command("status")(status.status)
app.command("gateway")(gateway.gateway)
app.command("scale")(scale.scale)
app.add_typer(dlq.app, name="dlq")
app.add_typer(budget.app, name="budget")
app.add_typer(audit.app, name="audit")
app.add_typer(ctx.app, name="ctx")
config_app = typer.Typer(help="Validate configuration files.", no_args_is_help=True)
config_app.command("check")(config_cmd.check)
app.add_typer(config_app, name="config")


def main() -> None:
    """Console-script entry point."""
    app()

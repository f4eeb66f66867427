"""The ``meterproxy`` command: a click group whose subcommands live in `meterproxy.commands`.

Each subcommand is its own module exposing ``command`` (a click command or
group); `COMMAND_MODULES` lists them, the way an extension would add one.
"""

from __future__ import annotations

from importlib import import_module

import click

from meterproxy import __version__
from meterproxy.store.backend import MissingDriver

__all__ = ["COMMAND_MODULES", "main"]

COMMAND_MODULES = [
    "meterproxy.commands.serve",
    "meterproxy.commands.prices",
    "meterproxy.commands.imports",
    "meterproxy.commands.report",
    "meterproxy.commands.status",
    "meterproxy.commands.reprice",
    "meterproxy.commands.migrate",
    "meterproxy.commands.budgets",
    "meterproxy.commands.health",
    "meterproxy.commands.reconcile",
    "meterproxy.commands.demo",
]


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MissingDriver as exc:  # --db postgresql://... without meterproxy[postgres]
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meterproxy")
def main() -> None:
    """Meter, price and record every LLM API call that passes through."""


for _name in COMMAND_MODULES:
    main.add_command(import_module(_name).command)

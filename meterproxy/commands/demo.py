"""``meterproxy demo [PATH]``: write a realistic demo database and say how to look at it.

The rows are `meterproxy.demo`'s (several providers and users, sessions,
errors, a budget block, unpriced models, Claude Code imports, four budgets).
The file must not exist yet: the demo never adds invented rows to a real
database. ``--serve`` then starts the proxy on it, so one command shows every
state of the page.
"""

from __future__ import annotations

from pathlib import Path

import click

from meterproxy.commands.serve import command as serve_command
from meterproxy.demo import DemoShape, write_demo

__all__ = ["command"]


@click.command("demo")
@click.argument("path", default="meterproxy-demo.db", type=click.Path(dir_okay=False))
@click.option("--requests", "count", default=6000, type=int, show_default=True, help="Rows to generate.")
@click.option("--days", default=38, type=int, show_default=True, help="Days of history, ending now.")
@click.option("--sessions", default=600, type=int, show_default=True, help="Distinct sessions.")
@click.option("--seed", default=18, type=int, show_default=True, help="Same seed, same rows.")
@click.option("--serve", is_flag=True, help="Then serve the page on it (meterproxy serve --db PATH).")
@click.option("--port", default=8787, show_default=True, help="Port for --serve.")
def command(path: str, count: int, days: int, sessions: int, seed: int, serve: bool, port: int) -> None:
    """Write a demo database (every state of the page) to PATH, a new SQLite file."""
    if Path(path).exists():
        raise click.UsageError(
            f"{path} exists; the demo writes only to a new file (delete it or pick another)"
        )
    if count < 1 or days < 1 or sessions < 1:
        raise click.UsageError("--requests, --days and --sessions must be at least 1")
    written = write_demo(path, DemoShape(count, days, sessions, seed))
    click.echo(f"wrote {written:,} demo requests over {days} days and 4 budgets to {path}")
    if not serve:
        click.echo(f"see it: meterproxy serve --db {path}   (then open http://127.0.0.1:8787/)")
        click.echo(f"or:     meterproxy report model --db {path}")
        return
    click.get_current_context().invoke(serve_command, db=path, port=port)

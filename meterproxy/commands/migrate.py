"""``meterproxy migrate SOURCE TARGET``: copy a store's history into another, e.g. SQLite -> PostgreSQL.

Both arguments are ``--db`` values (a path, ``sqlite:///path`` or
``postgresql://...``). The target is migrated to the current schema first;
then every shared table is copied in batches (see `meterproxy.store.copy`),
skipping rows already there, so the command can be re-run (after an
interruption, or to pick up rows the old store received meanwhile) and only
adds what is missing. A progress bar shows on a terminal; the counts per table
are printed at the end either way.

Stop the proxies writing to SOURCE first for a final copy; a copy taken while
they run is consistent per batch, and a second run brings the rest.
"""

from __future__ import annotations

import sys

import click

from meterproxy.store import backend
from meterproxy.store.copy import CopyError, copy_store, count_rows, open_target

__all__ = ["command"]


@click.command("migrate")
@click.argument("source")
@click.argument("target")
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=5_000, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
def command(source: str, target: str, batch: int, progress: bool | None) -> None:
    """Copy every request (and budgets, events, rollups...) from SOURCE into TARGET."""
    try:
        src_url, dst_url = backend.parse_db(source), backend.parse_db(target)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if src_url == dst_url:
        raise click.UsageError("SOURCE and TARGET are the same database")
    try:
        src = backend.connect(source, readonly=True)
        dst = open_target(target)
    except Exception as exc:
        raise click.ClickException(f"cannot open database: {exc}") from exc
    show = sys.stderr.isatty() if progress is None else progress
    try:
        total = count_rows(src, "requests")
        click.echo(f"copying {total} requests from {backend.describe(source)} to {backend.describe(target)}")
        with click.progressbar(
            length=total, label="requests", file=sys.stderr, hidden=not show, show_pos=True
        ) as bar:

            def advance(table: str, rows: int) -> None:
                if table == "requests":
                    bar.update(rows)

            result = copy_store(src, dst, batch=batch, progress=advance)
    except CopyError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        src.close()
        dst.close()
    for table, (read, added) in result.tables.items():
        click.echo(f"{table}: {read} read, {added} new")
    for note in result.notes:
        click.echo(f"note: {note}")

"""``meterproxy import``: bring usage that never went through the proxy into the database.

Subcommands: ``claude-code [PATH...]`` (Claude Code transcripts),
``spill FILE...`` (records a shutdown could not write to a failing database) and
``jsonl FILE --format zeroclaw|generic [--map FIELD=PATH] [--follow]``. All are
idempotent (see `meterproxy.imports`); malformed lines are listed on stderr and
skipped, and a progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

from meterproxy.commands.database import resolve_db
from meterproxy.imports import ImportStats, ImportStore
from meterproxy.imports import claude_code as cc
from meterproxy.imports.jsonl import FIELDS, PRESETS, LineMapping, follow, read_new
from meterproxy.pricing import PriceBook
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.spill import insert_spilled, read_spill

__all__ = ["command", "sqlite_db"]

MAX_LISTED = 20


def sqlite_db(db: str | None) -> str:
    """Imports write SQLite (its upsert and offset bookkeeping); PostgreSQL goes via migrate."""
    from meterproxy.store.backend import parse_db

    path = resolve_db(db)
    if parse_db(path).is_postgres:
        raise click.UsageError(
            "imports write to a SQLite file; import into one, then copy it with "
            "`meterproxy migrate FILE postgresql://...` (idempotent, so it can be repeated)"
        )
    return path


def _book(pricing: tuple[str, ...]) -> PriceBook:
    return PriceBook.load(overrides=[Path(p) for p in pricing])


def _report(stats: ImportStats) -> None:
    for problem in stats.malformed[:MAX_LISTED]:
        click.echo(f"skipped malformed line {problem}", err=True)
    if len(stats.malformed) > MAX_LISTED:
        click.echo(f"... and {len(stats.malformed) - MAX_LISTED} more malformed lines", err=True)
    click.echo(stats.summary())


db_option = click.option("--db", default=None, envvar="METERPROXY_DB", help="SQLite file [default: XDG].")
pricing_option = click.option("--pricing", multiple=True, help="Extra pricing TOML file (repeatable).")


@click.group("import")
def command() -> None:
    """Import usage from coding agents' local logs (idempotent: re-running adds nothing twice)."""


@command.command("claude-code")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@db_option
@pricing_option
def claude_code(paths: tuple[Path, ...], db: str | None, pricing: tuple[str, ...]) -> None:
    """Import Claude Code transcripts (default: ~/.claude/projects and ~/.config/claude/projects)."""
    roots = list(paths) or [p for p in cc.default_roots() if p.exists()]
    if not roots:
        raise click.UsageError("no Claude Code transcripts found; pass the projects folder as PATH")
    with ImportStore(sqlite_db(db)) as store:
        files = cc.find_files(roots)

        def progress(items: Iterable[Path]) -> Iterator[Path]:
            with click.progressbar(
                list(items), label="claude-code", file=sys.stderr, hidden=not sys.stderr.isatty()
            ) as bar:
                yield from bar

        stats = cc.import_claude_code(store, _book(pricing), files, progress=progress)
    _report(stats)


def _parse_maps(maps: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in maps:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r}: expected FIELD=PATH", param_hint="--map")
        out[name.strip()] = path.strip()
    return out


@command.command("jsonl")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([*PRESETS, "generic"]),
    default="generic",
    show_default=True,
    help="A known log format, or generic (fields from --map).",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="FIELD=PATH",
    help=f"Where a field is in each line, as a dotted path (fields: {', '.join(FIELDS)}).",
)
@click.option("--source", default=None, help="Source name stored on each row [default: the format].")
@click.option("--follow", "follow_", is_flag=True, help="Keep reading as the file grows (Ctrl-C to stop).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between checks.")
@db_option
@pricing_option
def jsonl(
    file: Path,
    fmt: str,
    maps: tuple[str, ...],
    source: str | None,
    follow_: bool,
    interval: float,
    db: str | None,
    pricing: tuple[str, ...],
) -> None:
    """Import a JSON-lines usage log, resuming from where the last import stopped."""
    if fmt == "generic" and not maps:
        raise click.UsageError("--format generic needs --map FIELD=PATH options (at least ts=...)")
    try:
        mapping = LineMapping.preset(
            fmt, source or (None if fmt != "generic" else "jsonl"), _parse_maps(maps)
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not follow_ and not file.exists():
        raise click.BadParameter(f"{file} does not exist", param_hint="FILE")
    book = _book(pricing)
    with ImportStore(sqlite_db(db)) as store:
        if not follow_:
            size = file.stat().st_size
            with click.progressbar(
                length=size, label=file.name, file=sys.stderr, hidden=not sys.stderr.isatty()
            ) as bar:
                stats = read_new(store, book, file, mapping, on_bytes=bar.update)
            stats.files = 1
            _report(stats)
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        seen = [0]

        def on_pass(stats: ImportStats) -> None:
            if stats.inserted != seen[0]:
                seen[0] = stats.inserted
                click.echo(f"{file}: {stats.inserted} imported so far", err=True)

        click.echo(f"following {file} (Ctrl-C to stop)", err=True)
        stats = follow(store, book, file, mapping, stop, interval=interval, on_pass=on_pass)
        stats.files = 1
        _report(stats)


@command.command("spill")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@db_option
def spill(files: tuple[Path, ...], db: str | None) -> None:
    """Insert records a shutdown could not write (``<db>.spill-*.jsonl``); rows already there are skipped."""
    conn = connect(sqlite_db(db))
    try:
        apply_migrations(conn)
        for file in files:
            try:
                rows = list(read_spill(file))
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            inserted, present = insert_spilled(conn, rows)
            click.echo(f"{file}: {inserted} record(s) imported, {present} already present")
    finally:
        conn.close()

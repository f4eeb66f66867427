"""Which database a command uses: resolved like ``serve`` resolves it, and said out loud.

A command run without ``--db`` (``report``, ``status``, ``import``,
``reprice``, ``budgets``) takes ``METERPROXY_DB``, the config file's ``db`` or
the default file, which may not be the database the proxy on this machine
records into (started with another ``--db``, or another user's data dir). So
without an explicit ``--db`` it prints, on stderr (stdout stays the command's
output), which database it uses and why, and warns when that database does
not exist or holds no requests, or when a proxy running here (see
`meterproxy.serving`) records into another one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click
from click.core import ParameterSource

from meterproxy.serving import database_identity, running
from meterproxy.settings import SettingsError, load_settings
from meterproxy.store.backend import describe, parse_db

__all__ = ["announce_db", "resolve_db", "same_database"]

_SAID = "meterproxy.database_announced"


def resolve_db(db: str | None, config_file: str | None = None, *, quiet: bool = False) -> str:
    """The database a command uses (``--db`` > ``METERPROXY_DB`` > config file > default), announced.

    ``quiet`` (``status``, which a shell prompt runs every time) prints only the warnings.
    """
    try:
        path = load_settings(config_file, cli={"db": db}).db
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    announce_db(path, quiet=quiet)
    return path


def _why() -> str | None:
    """How ``--db`` got its value; None when the user typed it or it was already said (once a run)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        if ctx.meta.get(_SAID):
            return None
        ctx.meta[_SAID] = True
    source = ctx.get_parameter_source("db") if ctx is not None else None
    if source is ParameterSource.COMMANDLINE:
        return None
    if source is ParameterSource.ENVIRONMENT:
        return "from METERPROXY_DB"
    return "the default; pass --db to choose"


def same_database(a: str, b: str) -> bool:
    return database_identity(a) == database_identity(b)


def _contents(db: str) -> str | None:
    """A warning about what the database holds, or None when it holds requests."""
    url = parse_db(db)
    if url.is_postgres:
        return None  # not probed: connecting may take long; the command reports its own errors
    path = Path(url.target)
    if not path.exists():
        return "it does not exist yet"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT 1 FROM requests LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return "it has no requests table (is it a meterproxy database?)"
    return None if row else "it holds no requests yet"


def announce_db(db: str, *, quiet: bool = False) -> None:
    why = _why()
    if why is None:
        return
    if not quiet:
        click.echo(f"meterproxy: using database {describe(db)} ({why})", err=True)
    servers = running()
    elsewhere = [s for s in servers if not same_database(s.db, db)]
    if servers and not elsewhere and not quiet:
        click.echo(f"meterproxy: the proxy at {servers[0].url} records into it", err=True)
    for server in elsewhere:
        click.echo(
            f"meterproxy: warning: the proxy at {server.url} (pid {server.pid}) records into "
            f"{server.db}, not this database; pass --db {server.db}",
            err=True,
        )
    problem = _contents(db)
    if problem:
        click.echo(f"meterproxy: warning: {describe(db)}: {problem}", err=True)

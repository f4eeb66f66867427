"""Start-up checks of ``meterproxy serve``: one clear line for each way a start fails.

When they run: after the settings are read and before the app is built, in
the process that starts serving (the supervisor, with ``--workers``). Each
failure becomes a `StartupError` whose message names the problem and what to
do; ``serve`` prints it as one line and exits 1. Without them, each fault
surfaced as a traceback from deep inside aiohttp or SQLite, and a port in use
was reported only after the log had already said "listening".

- `check_database`: the database is opened and migrated once, here: a ``--db``
  whose parent is a file, a file that is not a SQLite database, a read-only
  file or directory, an unreachable PostgreSQL server.
- `bind_listener`: the listening socket is bound here, before the app starts
  (so "listening" is logged only once it is true), and handed to aiohttp.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
from pathlib import Path

from meterproxy.store.backend import apply_migrations, connect, describe, parse_db

__all__ = ["StartupError", "bind_listener", "check_database"]


class StartupError(Exception):
    """A reason ``serve`` cannot start, worded for the person who started it."""


def _parent_problem(path: Path) -> str | None:
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a directory"
    return None


def check_database(db: str) -> None:
    """Open ``db`` and apply the migrations, or raise `StartupError` saying why not."""
    target = parse_db(db)
    shown = describe(db)
    if not target.is_postgres:
        problem = _parent_problem(Path(target.target))
        if problem:
            raise StartupError(f"cannot create the database {shown}: {problem}")
    try:
        conn = connect(db)
        try:
            apply_migrations(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "not a database" in text:
            raise StartupError(
                f"{shown} is not a SQLite database (a different file, or corrupt); "
                "point --db at a new or meterproxy file"
            ) from None
        if "readonly" in text or "unable to open" in text or "read-only" in text:
            raise StartupError(
                f"cannot write the database {shown}: {text} "
                "(the file or its directory is read-only; SQLite also needs to create -wal and -shm "
                "files next to it)"
            ) from None
        raise StartupError(f"cannot use the database {shown}: {text}") from None
    except PermissionError as exc:
        raise StartupError(f"cannot write the database {shown}: {exc.strerror} ({exc.filename})") from None
    except OSError as exc:
        raise StartupError(f"cannot open the database {shown}: {exc.strerror or exc}") from None
    except Exception as exc:  # PostgreSQL drivers' own errors: unreachable, refused, auth
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"cannot open the database {shown}: {first}") from None


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket on ``host:port`` (what aiohttp would bind), or `StartupError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128, reuse_port=reuse_port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cannot listen on {host}:{port}: the address is already in use "
                "(another meterproxy, or another program); stop it or choose another --port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot listen on {host}:{port}: no such address on this machine") from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"cannot listen on {host}:{port}: permission denied (a port below 1024?)"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

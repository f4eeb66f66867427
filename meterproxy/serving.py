"""Which proxies run on this machine, and which database each records into.

``meterproxy serve`` leaves a small JSON file per running server in
``$XDG_STATE_HOME/meterproxy/serving/<pid>.json`` (``~/.local/state/...`` by
default): its pid, its URL and its database (a PostgreSQL password masked).
It removes the file when it stops; a file whose process is gone (a server
killed with SIGKILL) is ignored and cleaned up by the next reader. CLI commands
that read or write a database (``report``, ``status``, ``import``,
``reprice``, ``budgets``) use it to warn when they are about to use another
database than the proxy on this machine records into. Nothing here is
reachable over the network.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from meterproxy.settings import Settings
from meterproxy.store.backend import describe, parse_db

__all__ = ["Serving", "database_identity", "running", "serving_dir", "serving_file"]


@dataclass(frozen=True, slots=True)
class Serving:
    pid: int
    url: str
    db: str


def serving_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meterproxy" / "serving"


def database_identity(db: str) -> str:
    """How a database is named across processes: an absolute file path, or the URL without password."""
    parsed = parse_db(db)
    if parsed.is_postgres:
        return describe(db)
    return str(Path(parsed.target).expanduser().resolve())


@contextlib.contextmanager
def serving_file(settings: Settings) -> Iterator[Path]:
    """Announce this process as the server ``settings`` describe while the block runs."""
    url, db = f"http://{settings.host}:{settings.port}", settings.db
    directory = serving_dir()
    path = directory / f"{os.getpid()}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(Serving(os.getpid(), url, database_identity(db)))))
    except OSError:  # a read-only home must not stop the proxy: the warning is a convenience
        pass
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def running() -> list[Serving]:
    """The servers announced on this machine whose process is still alive."""
    found = []
    for path in sorted(serving_dir().glob("*.json")):
        try:
            entry = Serving(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _alive(entry.pid):
            found.append(entry)
        else:
            path.unlink(missing_ok=True)
    return found

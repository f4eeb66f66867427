"""Commands without ``--db`` say which database they use, and warn when it is empty or not the proxy's.

The proxy is the real ``meterproxy serve`` in its own process (it announces
itself in ``$XDG_STATE_HOME/meterproxy/serving``); the commands run through
click's runner in this process, with stdout and stderr kept apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.serving import running, serving_dir
from meterproxy.settings import default_db_path
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.schema import COLUMNS, record_to_row
from meterproxy.testing import free_port, make_record, wait_healthy


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[str, str, int]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.stdout, result.stderr, result.exit_code


def _db_with_rows(path: Path, n: int) -> None:
    conn = connect(path)
    apply_migrations(conn)
    with conn.transaction():
        for _ in range(n):
            row = record_to_row(make_record())
            marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
            conn.execute(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({marks})", list(row))
    conn.close()


def test_without_db_the_command_names_the_default_database_and_that_it_is_missing() -> None:
    stdout, stderr, code = _run("report", "--json")
    assert code != 0  # nothing to report from: the report says so itself
    assert f"using database {default_db_path()} (the default; pass --db to choose)" in stderr
    assert "does not exist yet" in stderr
    assert "using database" not in stdout


def test_an_explicit_db_is_not_announced(tmp_path: Path) -> None:
    db = tmp_path / "mine.db"
    _db_with_rows(db, 1)
    _, stderr, code = _run("report", "--json", "--db", str(db))
    assert code == 0, stderr
    assert "using database" not in stderr and "warning" not in stderr


def test_an_empty_database_from_the_environment_is_named_and_flagged(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    _db_with_rows(db, 0)
    _, stderr, _ = _run("budgets", "list", env={"METERPROXY_DB": str(db)})
    assert f"using database {db} (from METERPROXY_DB)" in stderr
    assert "holds no requests yet" in stderr


@pytest.mark.slow
async def test_a_command_warns_when_the_running_proxy_records_elsewhere(tmp_path: Path) -> None:
    served, other = tmp_path / "served.db", tmp_path / "other.db"
    _db_with_rows(other, 2)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterproxy", "serve", "--port", str(port), "--db", str(served)],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        [server] = running()
        assert server.pid == proc.pid and server.db == str(served.resolve())

        _, stderr, _ = _run("report", "--json", env={"METERPROXY_DB": str(other)})
        assert f"the proxy at http://127.0.0.1:{port} (pid {proc.pid}) records into {served}" in stderr
        assert f"pass --db {served}" in stderr

        _, stderr, _ = _run("report", "--json", env={"METERPROXY_DB": str(served)})
        assert f"the proxy at http://127.0.0.1:{port} records into it" in stderr
        assert "records into" not in stderr.replace("records into it", "")

        _, stderr, _ = _run("status", env={"METERPROXY_DB": str(other)})  # a prompt: warnings only
        assert "using database" not in stderr and "records into" in stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert list(serving_dir().glob("*.json")) == []  # it removed its announcement when it stopped

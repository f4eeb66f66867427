"""Start-up faults end in one clear line and a non-zero exit, never a traceback (issue 14.10).

``meterproxy serve`` runs as a real subprocess against each fault: the port is
already in use (and "listening" must not be logged), ``--db`` names a path
below a file, a file that is not a database, a database in a read-only
directory (made read-only with ``chattr +i``, which stops root too; skipped
where the filesystem has no such flag). ``budgets add`` with an amount that is
not a number names the option and says what it wants.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.testing import free_port


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterproxy", "serve", "--upstream", "openai=http://127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def _one_clear_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve(tmp_path, "--port", str(port), "--db", str(tmp_path / "m.db"))
    _one_clear_line(result, str(port), "already in use")
    assert "listening" not in result.stdout + result.stderr


def test_db_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = _serve(tmp_path, "--port", str(free_port()), "--db", str(tmp_path / "afile" / "m.db"))
    _one_clear_line(result, "afile", "is a file")


def test_db_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("these are my notes, not a database\n" * 100)
    result = _serve(tmp_path, "--port", str(free_port()), "--db", str(tmp_path / "notes.db"))
    _one_clear_line(result, "notes.db", "not a SQLite database")
    assert (tmp_path / "notes.db").read_text().startswith("these are my notes")  # left untouched


def test_db_in_a_read_only_directory(tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    ro = tmp_path / "ro"
    ro.mkdir()
    sqlite3.connect(ro / "m.db").close()  # an existing, valid (empty) database
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem cannot make a directory immutable")
    try:
        result = _serve(tmp_path, "--port", str(free_port()), "--db", str(ro / "m.db"))
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    _one_clear_line(result, "m.db", "read-only")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--limit", "abc"], ["--limit", "abc", "amount in USD"]),
        (["--limit", "-5"], ["--limit"]),
        (["--limit", "10", "--threshold", "abc"], ["--threshold", "abc"]),
        (["--limit", "10", "--period", "fortnight"], ["--period"]),
    ],
)
def test_budgets_add_bad_values_say_which_option(tmp_path: Path, args: list[str], words: list[str]) -> None:
    result = CliRunner().invoke(main, ["budgets", "add", "team", *args, "--db", str(tmp_path / "m.db")])
    assert result.exit_code == 2, result.output
    assert "pydantic" not in result.output and "validation error" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert word in result.output, result.output

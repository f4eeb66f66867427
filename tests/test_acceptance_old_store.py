"""Acceptance: every command that reads the store works on a database an older version wrote.

A user upgrades and runs ``report --as-model`` or ``reprice`` before ``serve``
has opened the database: ``report`` itself applied the pending migrations
first, but these two read columns newer versions added (``audio_input_tokens``,
``cost_source``) and ended in ``OperationalError: no such column``. The
database is a real store of an earlier version (``tests/fixtures/legacy/``).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from meterproxy.cli import main

LEGACY = Path(__file__).parent / "fixtures" / "legacy" / "store-sqlite.sql"


def old_store(tmp_path: Path) -> str:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(LEGACY.read_text())
    conn.close()
    return str(db)


def test_report_as_model_on_an_older_store(tmp_path: Path) -> None:
    db = old_store(tmp_path)
    out = CliRunner().invoke(main, ["report", "--db", db, "--as-model", "gpt-4o-mini", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["totals"]["requests"] == 12


def test_reprice_on_an_older_store(tmp_path: Path) -> None:
    db = old_store(tmp_path)
    out = CliRunner().invoke(main, ["reprice", "--db", db, "--since", "2000-01-01", "--dry-run"])
    assert out.exit_code == 0, out.output

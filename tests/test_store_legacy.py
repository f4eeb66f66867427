"""Stores written by earlier versions open, migrate and keep answering; PostgreSQL loses the emulator.

The fixtures in ``tests/fixtures/legacy/`` are real stores made by the version
before the SQLite emulator for PostgreSQL was removed (the same 12 requests,
8 of them rolled up, a budget): ``store-sqlite.sql`` is that SQLite file's
``.dump``, ``store-postgresql.sql`` the ``pg_dump --inserts`` of that
PostgreSQL database (with the shim functions, aggregates and ``sqlite_master``
view it installed). Each is loaded, opened by the current code, and then must
answer summaries exactly, take new records and roll them up.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from meterproxy.store import backend
from meterproxy.store.migrations import pending_migrations
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import roll_up
from meterproxy.store.schema import record_to_row
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import INSERT_REQUEST
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.helpers.pg import fresh_database, pg_or_skip

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
LEGACY_ROWS = 12
#: What earlier versions installed into a PostgreSQL schema beside their tables.
SHIMS = {
    "ifnull",
    "json_extract",
    "strftime",
    "sqlite_ts",
    "sqlite_bool_sum",
    "json",
    "iif",
    "json_group_array",
}


def check_store(url: str) -> None:
    """Migrate, then: exact totals over old rows (raw and rolled up), new rows in, rolled up, counted."""
    conn = backend.connect(url)
    try:
        pending = pending_migrations(conn)  # read from the table the previous version kept
        applied = backend.apply_migrations(conn)
        assert applied == pending and "meterproxy.core:m004_no_sqlite_emulation" in applied
        # Nothing the previous version applied runs again.
        assert not any(
            name.endswith(("m001_requests", "m001_rollups", "m001_budget_tables")) for name in applied
        )
        assert backend.apply_migrations(conn) == []
        want = conn.execute("SELECT count(*), sum(cost_pico), sum(input_tokens) FROM requests").fetchone()
        assert want[0] == LEGACY_ROWS

        def totals() -> tuple[int, int, int]:
            read = backend.read_connection(url)
            try:
                t = summarize(read, SummaryQuery(RequestFilter(), ["model"])).totals
            finally:
                read.close()
            return t["requests"], t["cost_pico"], t["input_tokens"]

        assert totals() == tuple(want)  # 8 rows from rollups, 4 raw above the watermark
        new = [make_record(usage=Usage(input_tokens=7, output_tokens=1)) for _ in range(3)]
        with conn.transaction():
            conn.lock_request_order()
            conn.executemany(INSERT_REQUEST, [record_to_row(r) for r in new])
        with conn.transaction():
            assert roll_up(conn) == 4 + 3
        now = conn.execute("SELECT count(*), sum(cost_pico), sum(input_tokens) FROM requests").fetchone()
        assert totals() == tuple(now)  # every row from rollups now
        assert (now[0], now[2]) == (LEGACY_ROWS + 3, want[2] + 21)
        day = conn.execute("SELECT sum(requests) FROM rollup_day").fetchone()[0]
        coarse = conn.execute("SELECT sum(requests) FROM rollup_day_model").fetchone()[0]
        assert day == coarse == LEGACY_ROWS + 3  # the old triggers still keep the coarse table
        budgets = conn.execute("SELECT name FROM budgets").fetchall()
        assert [b[0] for b in budgets] == ["monthly"]
    finally:
        conn.close()


def test_a_sqlite_store_from_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript((FIXTURES / "store-sqlite.sql").read_text())
    old.close()
    check_store(str(path))
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert "meterproxy_migrations" in tables and "_sqlite_migrations" not in tables


def test_a_postgresql_store_from_the_previous_version_loses_the_emulator() -> None:
    pg_or_skip()
    with fresh_database() as url:
        with psycopg.connect(url, autocommit=True) as load:
            load.execute((FIXTURES / "store-postgresql.sql").read_text())  # type: ignore[arg-type]
        with psycopg.connect(url) as before:
            names = {
                r[0]
                for r in before.execute(
                    "SELECT proname FROM pg_proc p JOIN pg_namespace n "
                    "ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
                )
            }
        assert names >= SHIMS  # the fixture is what the emulator left behind
        check_store(url)
        with psycopg.connect(url) as after:
            left = {
                r[0]
                for r in after.execute(
                    "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = 'public'"
                )
            }
            views = after.execute("SELECT count(*) FROM pg_views WHERE schemaname = 'public'").fetchone()
            legacy = after.execute("SELECT to_regclass('public._migrations')").fetchone()
        # Only the functions of meterproxy's own row triggers remain; no shim, no view.
        assert left and all(name.endswith("_fn") for name in left), left
        assert views == (0,) and legacy == (None,)


def test_a_fresh_postgresql_store_holds_only_meterproxy_tables() -> None:
    pg_or_skip()
    with fresh_database() as url:
        conn = backend.connect(url)
        try:
            backend.apply_migrations(conn)
        finally:
            conn.close()
        with psycopg.connect(url) as check:
            kinds = check.execute(
                "SELECT c.relkind, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm') GROUP BY 1"
            ).fetchall()
            aggregates = check.execute(
                "SELECT count(*) FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
            ).fetchone()
            functions = {
                r[0]
                for r in check.execute(
                    "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = 'public'"
                )
            }
        assert kinds == [] and aggregates == (0,)
        assert functions == {
            "rollup_day_ai_fn",
            "rollup_day_au_fn",
            "rollup_day_ad_fn",
            "rollup_hour_ai_fn",
            "rollup_hour_au_fn",
            "rollup_hour_ad_fn",
            "request_content_follows_fn",
        }


PG_DOWN = "postgresql://u@127.0.0.1:1/x"


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "0", "--db", PG_DOWN],
        ["report", "--db", PG_DOWN],
        ["budgets", "list", "--db", PG_DOWN],
    ],
)
def test_postgresql_without_the_extra_says_which_to_install(args: list[str], tmp_path: Path) -> None:
    """``--db postgresql://`` with psycopg not importable: one clear line, no traceback."""
    script = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "from meterproxy.cli import main\n"
        f"main({args!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'meterproxy[postgres]'" in result.stderr
    assert "Traceback" not in result.stderr

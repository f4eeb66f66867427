"""``meterproxy migrate``: a SQLite history copied into PostgreSQL exactly, and again without doubles.

The source is a real SQLite store written by the real writer, rolled up and
compacted by the real maintenance functions (so part of its history exists
only in the rollups). After the copy, every summary on PostgreSQL equals the
same summary on SQLite; a second run adds nothing; rows added to the source
meanwhile come across on the next run and are rolled up by the target's own
maintenance.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.store import backend
from meterproxy.store.copy import open_target
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import compact, roll_up
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage
from tests.helpers.pg import fresh_database, pg_or_skip

START = datetime(2026, 9, 1, tzinfo=UTC)


def records(n: int, seed: int, start: datetime = START) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        record = make_record(
            model=rng.choice(["gpt-4o", "gpt-4o-mini"]),
            ts=start + timedelta(seconds=rng.randrange(20 * 86400)),
            usage=Usage(input_tokens=rng.randrange(1, 5000), output_tokens=rng.randrange(1, 900)),
            user=rng.choice(["ana", "bo"]),
        )
        record.cost_usd = Decimal(rng.randrange(1, 10**9)).scaleb(-12)
        out.append(record)
    return out


def write(db: str, batch: list[RequestRecord]) -> None:
    writer = StoreWriter(db)
    writer.start()
    for record in batch:
        assert writer.submit(record)
    assert writer.close()


def maintain(db: str, retention_cutoff: str | None = None) -> None:
    conn = backend.connect(db)
    try:
        for fn in [lambda c: roll_up(c)] + (
            [lambda c: compact(c, retention_cutoff)] if retention_cutoff else []
        ):
            while True:
                with conn.transaction():
                    n = fn(conn)
                if not n:
                    break
    finally:
        conn.close()


def summaries(db: str) -> list[object]:
    conn = backend.read_connection(db)
    try:
        return [
            summarize(conn, SummaryQuery(RequestFilter(), group_by)).totals
            if not group_by
            else summarize(conn, SummaryQuery(RequestFilter(), group_by)).groups
            for group_by in ([], ["model", "day"], ["user"])
        ]
    finally:
        conn.close()


def migrate(source: str, target: str) -> str:
    result = CliRunner().invoke(main, ["migrate", source, target, "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def test_copy_is_exact_idempotent_and_incremental(tmp_path: Path) -> None:
    pg_or_skip()
    sqlite_db = str(tmp_path / "old.db")
    first = records(3000, seed=1)
    write(sqlite_db, first)
    cutoff = (START + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    maintain(sqlite_db, retention_cutoff=cutoff)  # the first week now lives only in the rollups
    raw_left = sqlite3.connect(sqlite_db).execute("SELECT count(*) FROM requests").fetchone()[0]
    assert 0 < raw_left < len(first)
    with fresh_database() as pg:
        output = migrate(f"sqlite:///{sqlite_db}", pg)
        assert f"requests: {raw_left} read, {raw_left} new" in output
        assert summaries(pg) == summaries(sqlite_db)
        # Totals are the records' own, not merely equal on both sides.
        totals = summaries(pg)[0]
        assert isinstance(totals, dict)
        assert totals["requests"] == len(first)
        assert totals["cost_pico"] == sum(int(r.cost_usd.scaleb(12)) for r in first if r.cost_usd)

        assert f"requests: {raw_left} read, 0 new" in migrate(sqlite_db, pg)  # again: nothing doubles

        later = records(500, seed=2, start=START + timedelta(days=25))
        write(sqlite_db, later)
        assert "requests: " in migrate(sqlite_db, pg)
        maintain(sqlite_db)
        maintain(pg)  # the target rolls up what it received, as its proxies' maintenance would
        assert summaries(pg) == summaries(sqlite_db)
        assert summaries(pg)[0]["requests"] == len(first) + len(later)  # type: ignore[index]
        # The target is a working store: a writer on it carries on.
        write(pg, records(10, seed=3))


def test_refuses_to_merge_compacted_history_into_a_used_target(tmp_path: Path) -> None:
    pg_or_skip()
    sqlite_db = str(tmp_path / "old.db")
    write(sqlite_db, records(200, seed=4))
    maintain(sqlite_db, retention_cutoff=(START + timedelta(days=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    with fresh_database() as pg:
        write(pg, records(5, seed=5))
        result = CliRunner().invoke(main, ["migrate", sqlite_db, pg, "--no-progress"])
        assert result.exit_code != 0
        assert "empty target" in result.output
        assert "0 new" not in result.output  # refused before copying anything


def test_bad_urls_are_usage_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["migrate", "mysql://x/y", str(tmp_path / "t.db")])
    assert result.exit_code == 2
    assert "postgresql://" in result.output


@pytest.mark.parametrize("direction", ["pg_to_sqlite"])
def test_copy_back_to_sqlite(tmp_path: Path, direction: str) -> None:
    pg_or_skip()
    with fresh_database() as pg:
        write(pg, records(300, seed=6))
        target = str(tmp_path / "back.db")
        conn = open_target(target)
        conn.close()
        migrate(pg, target)
        maintain(pg)
        maintain(target)
        assert summaries(target) == summaries(pg)

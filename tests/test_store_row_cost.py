"""The writer's cheaper row path (issue 21, step 5) writes what the plain code wrote.

`format_ts` from a per-second prefix, `stored_cost_text` in integer arithmetic, NULLs bound
through the registered adapter, multi-row INSERTs, and the SQLite roll-up grouping by hour
once: each checked against the code it replaced.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterproxy import timestamps
from meterproxy.money import stored_cost_text
from meterproxy.store import rollups
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.schema import COLUMNS, record_to_row
from meterproxy.store.writer import _insert_rows
from meterproxy.testing import make_record
from meterproxy.usage import Usage


def _isoformat_ts(moment: datetime) -> str:
    """format_ts as it was written before the per-second prefix."""
    if moment.tzinfo is not None:
        if moment.tzinfo is not UTC:
            moment = moment.astimezone(UTC)
        text = moment.isoformat(timespec="microseconds")[:-6]
    else:
        text = moment.isoformat(timespec="microseconds")
    if moment.year < 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return text + "Z"


def test_format_ts_is_the_isoformat_text() -> None:
    rnd = random.Random(1)
    moment = datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    for i in range(20_000):
        if i % 5 == 0:
            moment = datetime(
                rnd.randrange(1, 10_000), rnd.randrange(1, 13), rnd.randrange(1, 29), rnd.randrange(24),
                rnd.randrange(60), rnd.randrange(60), rnd.choice([0, 1, 999_999, rnd.randrange(10**6)]),
                tzinfo=UTC,
            )  # fmt: skip
        elif moment.year < 9999:
            moment += timedelta(microseconds=rnd.randrange(400_000))
        assert timestamps.format_ts(moment) == _isoformat_ts(moment)
    other = datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2026, 1, 1, 1, 2, 3, 4)
    assert timestamps.format_ts(other) == _isoformat_ts(other) == "2025-12-31T23:02:03.000004Z"
    assert timestamps.format_ts(naive) == _isoformat_ts(naive) == "2026-01-01T01:02:03.000004Z"


def test_stored_cost_text_is_the_decimal_text() -> None:
    rnd = random.Random(2)
    values = [0, 1, -1, 10**12, -(10**12), 10**12 - 1, 10**28 - 1, 10**28, -(10**28), 10**35]
    values += [rnd.randrange(-(10**20), 10**20) for _ in range(5_000)]
    values += [rnd.randrange(-(10**6), 10**6) for _ in range(5_000)]
    for pico in values:
        assert stored_cost_text(pico) == format(Decimal(pico).scaleb(-12), "f"), pico
    assert stored_cost_text(None) is None


def test_rows_go_in_as_they_are_multi_row_and_null(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "s.db"))
    apply_migrations(conn)
    records = [make_record() for _ in range(150)]  # past one 64-row statement
    rows = [record_to_row(r) for r in records]
    with conn.transaction():
        assert conn.insert_many("requests", COLUMNS, rows, key="id") == 150
        # A batch retried after a lost commit: the rows already there are skipped, not counted.
        retried = [*rows[:70], record_to_row(make_record())]
        assert conn.insert_many("requests", COLUMNS, retried, key="id") == 1
    names = ", ".join(f'"{c}"' for c in COLUMNS)
    stored = {r[0]: tuple(r) for r in conn.execute(f"SELECT {names} FROM requests")}
    assert len(stored) == 151
    for row in rows:
        assert stored[row[0]] == row  # None as NULL, every value as given
    assert conn.execute("SELECT count(*) FROM requests WHERE session IS NULL").fetchone()[0] == 151
    with pytest.raises(sqlite3.ProgrammingError), conn.transaction():
        conn.insert_many("requests", COLUMNS, [rows[0][:-1]], key="id")
    conn.close()


@pytest.mark.parametrize("batch", [7, 300, 5_000])
def test_sqlite_roll_up_equals_one_statement_per_table(tmp_path: Path, batch: int) -> None:
    rnd = random.Random(batch)
    start = datetime(2026, 11, 28, tzinfo=UTC)
    records = []
    for _ in range(1_500):
        r = make_record(usage=Usage(input_tokens=rnd.randrange(1000), output_tokens=rnd.randrange(100)))
        r.ts = start + timedelta(seconds=rnd.randrange(3 * 86_400))
        r.model, r.provider = rnd.choice(["a", "b", None]), rnd.choice(["openai", None])
        r.user, r.key_fingerprint = rnd.choice(["x", None, ""]), rnd.choice(["k", None])
        r.source, r.status = rnd.choice(["proxy", "import"]), rnd.choice([200, 500, None])
        r.error, r.usage_source = rnd.choice([None, "boom"]), rnd.choice(["reported", "partial", "none"])
        if rnd.random() < 0.7:
            r.cost_usd, r.cost_source = (
                Decimal(rnd.randrange(10**6)) / 10**9,
                rnd.choice(["computed", "provider"]),
            )
        records.append(r)

    def rolled(new: bool, name: str) -> dict[str, list[tuple[object, ...]]]:
        conn = connect(str(tmp_path / name))
        apply_migrations(conn)
        for low in range(0, len(records), 500):
            with conn.transaction():
                _insert_rows(conn, [record_to_row(r) for r in records[low : low + 500]])
            while True:
                with conn.transaction():
                    if new:
                        n = rollups.roll_up(conn, batch)
                    else:  # the statements PostgreSQL still runs, one per table
                        low_mark = rollups.rollup_state(conn).watermark
                        n, high = conn.execute(
                            "SELECT count(*), max(rowid) FROM (SELECT rowid FROM requests WHERE rowid > $1 "
                            "ORDER BY rowid LIMIT $2) AS b",
                            [low_mark, batch],
                        ).fetchone()
                        if n:
                            for sql in rollups._UPSERTS:
                                conn.execute(sql, [low_mark, high])
                            conn.execute("UPDATE rollup_state SET watermark = $1 WHERE id = 1", [high])
                if not n:
                    break
        tables = ("rollup_hour", "rollup_day", "rollup_day_model", "rollup_hour_model")
        out = {t: sorted(tuple(r) for r in conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
        assert conn.execute("SELECT count(*) FROM temp.rollup_batch").fetchone()[0] == 0 if new else True
        conn.close()
        return out

    assert rolled(True, "new.db") == rolled(False, "old.db")

"""The export: the same bytes with either SQLite, on PostgreSQL, in (ts, id) order, any slicing.

Rows go into a real database file through the writer's own INSERT; the export
runs as the API runs it (`ExportProcess`: a real child process, real pipe) with
tiny slices so that slice edges, ties on ``ts`` and rowids out of time order all
occur. The expected text is computed independently: in this process, with the
standard ``sqlite3`` module, one ``printf``/``json_object`` per row in a single
ordered query (the pre-child formatting, floats spelled ``%!.15g``). The same rows
in a fresh PostgreSQL database, exported as the API does there (`SlicedExport`:
``COPY`` of hour slices, two threads), give exactly the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from meterproxy.store import export
from meterproxy.store.backend import Readers, apply_migrations, connect
from meterproxy.store.db import Params
from meterproxy.store.dialect import SQLITE
from meterproxy.store.export_process import ExportFailed, ExportProcess
from meterproxy.store.queries import RequestFilter
from meterproxy.store.schema import record_to_row
from meterproxy.store.writer import INSERT_REQUEST
from meterproxy.testing import make_record
from meterproxy.usage import Usage
from tests.helpers.pg import fresh_database, pg_or_skip

T0 = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)
DRIVERS = ["sqlite3", "apsw"]
WEIRD = 'a "quoted", comma\r\nnew line é ✓ \\ back\tslash'
#: A spreadsheet formula (neutralised in CSV, kept in JSON) with control characters and non-ASCII.
FORMULA = "=cmd|' /C calc'!A0\x01\x1f\x7f €\u2028 \\N"


def build(path: Path | str) -> list[str]:
    """A database with awkward rows; returns the ids."""
    records = []
    for i in range(120):
        # Pairs of rows share a ts (ties broken by id); ids deliberately not in rowid order.
        ts = T0 + timedelta(seconds=90 * (i // 2))
        records.append(
            make_record(
                id=f"r{(i * 37) % 120:04d}",
                ts=ts,
                model=None if i % 11 == 0 else f"m{i % 3}",
                user=WEIRD if i % 5 == 0 else (None if i % 5 == 1 else f"u{i % 4}"),
                session=FORMULA if i % 7 == 0 else ("+1" if i % 7 == 1 else f"s{i % 4}"),
                tags={} if i % 3 else {"team": 'x"y,z', "env": "prod"},
                cost_usd=None if i % 9 == 0 else Decimal(i).scaleb(-12) * 1234567,
                provider_cost_usd=Decimal("0.0000012") if i % 13 == 0 else None,
                duration_ms=[0.1 + 0.2, 1234.5678901234567, 200.0, 1e20, None, 333.3333333333333][i % 6]
                if i < 100
                else [999999999999999.9, 0.0001, 9.99999e-05, -2.5e-7, 47.99999999999999][i % 5],
                ttfb_ms=None if i % 2 else 47.99999999999999,
                upstream_ms=float(i),
                streamed=bool(i % 2),
                client_disconnected=i % 19 == 0,
                error='boom, "x"' if i % 23 == 0 else None,
                usage=Usage(input_tokens=i, output_tokens=2 * i, cache_read_tokens=i % 5),
            )
        )
        records[-1].status = None if i % 17 == 0 else 200
    # Inserted newest first for a third of them: rowid order is not time order.
    records = records[80:][::-1] + records[:80]
    conn = connect(path)
    apply_migrations(conn)
    conn.executemany(INSERT_REQUEST, [record_to_row(r) for r in records])
    conn.close()
    return [r.id for r in records]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "store.db"
    build(path)
    return path


def expected(path: Path, flt: RequestFilter, fmt: str) -> bytes:
    """The export computed in this process by one ordered query (the pre-child formatting)."""
    line = export.LINE_SQL[fmt]
    p = Params()
    where = flt.where(p, SQLITE)
    conn = sqlite3.connect(path)
    bound = {str(i): v for i, v in enumerate(p.values, 1)}
    rows = conn.execute(f"SELECT {line} FROM requests WHERE {where} ORDER BY ts, id", bound).fetchall()
    conn.close()
    return "".join(r[0] for r in rows).encode()


async def run_export(path: Path, flt: RequestFilter, fmt: str, driver: str, slice_rows: int = 7) -> bytes:
    proc = await ExportProcess.start(str(path), flt, fmt, workers=2, slice_rows=slice_rows, driver=driver)
    out = bytearray()
    try:
        while chunk := await proc.read():
            out += chunk
    finally:
        await proc.close()
    return bytes(out)


FILTERS = [
    RequestFilter(),
    RequestFilter(
        since=(T0 + timedelta(minutes=7)).isoformat(), until=(T0 + timedelta(minutes=61)).isoformat()
    ),
    RequestFilter(user="u1"),
    RequestFilter(tags={"team": 'x"y,z'}, since=(T0 + timedelta(minutes=30)).isoformat()),
    RequestFilter(until=T0.isoformat()),  # nothing before the first row
    # Values with quotes, a backslash, CR LF: PostgreSQL's COPY writes them into the SQL as literals.
    RequestFilter(user=WEIRD),
    RequestFilter(session=FORMULA),
]
FILTER_IDS = ["all", "range", "user", "tag", "empty", "quoted-user", "quoted-session"]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("flt", FILTERS, ids=FILTER_IDS)
async def test_child_export_equals_one_ordered_query(
    db: Path, driver: str, fmt: str, flt: RequestFilter
) -> None:
    if driver == "apsw":
        pytest.importorskip("apsw")
    want = expected(db, flt, fmt)
    assert await run_export(db, flt, fmt, driver) == want
    if flt.until != T0.isoformat():
        assert want, "the filter should match some rows"


@pytest.mark.parametrize("slice_rows", [1, 2, 1000])
async def test_slices_smaller_than_a_tie_and_larger_than_the_table(db: Path, slice_rows: int) -> None:
    assert await run_export(db, RequestFilter(), "csv", "auto", slice_rows) == expected(
        db, RequestFilter(), "csv"
    )


async def test_the_csv_parses_back_to_the_rows(db: Path) -> None:
    text = (await run_export(db, RequestFilter(), "csv", "auto")).decode()
    rows = list(csv.reader(io.StringIO(text)))
    conn = sqlite3.connect(db)
    ids = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY ts, id")]
    conn.close()
    assert [r[0] for r in rows] == ids and len(ids) == 120
    assert {len(r) for r in rows} == {len(export.EXPORT_COLUMNS)}
    col = {c: i for i, c in enumerate(export.EXPORT_COLUMNS)}
    assert any(r[col["user"]] == WEIRD for r in rows)
    assert {r[col["duration_ms"]] for r in rows} >= {"0.3", "1234.56789012346", "200.0", "1.0e+20", ""}
    # Lines end at "\n" only: text may hold U+2028, where str.splitlines would also cut.
    lines = (await run_export(db, RequestFilter(), "jsonl", "auto")).decode().split("\n")[:-1]
    objects = [json.loads(x, parse_float=Decimal) for x in lines]
    assert [o["id"] for o in objects] == ids and list(objects[0]) == export.EXPORT_COLUMNS


@pytest.fixture(scope="module")
def pg_db(db: Path) -> Iterator[str]:
    """The same rows as `db`, in a fresh PostgreSQL database."""
    pg_or_skip()
    with fresh_database() as url:
        build(url)
        yield url


def pg_export(url: str, flt: RequestFilter, fmt: str) -> bytes:
    """The export as the API runs it on PostgreSQL (hour slices, two threads, the app's readers)."""
    with Readers(url) as readers:
        conn = readers.connection()
        try:
            slices = export.time_slices(conn, flt.since, flt.until, timedelta(hours=1))
        finally:
            conn.close()
        run = export.SlicedExport(readers.connection, flt, fmt, slices, workers=2)
        out = bytearray()
        try:
            while (chunk := run.next_chunk()) is not None:
                out += chunk
        finally:
            run.close()
    return bytes(out)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("flt", FILTERS, ids=FILTER_IDS)
def test_postgres_export_is_byte_identical_to_sqlite(
    db: Path, pg_db: str, fmt: str, flt: RequestFilter
) -> None:
    want = expected(db, flt, fmt)
    got = pg_export(pg_db, flt, fmt)
    if got != want:  # show the first line that differs, not two megabytes
        pairs = zip(got.split(b"\n"), want.split(b"\n"), strict=False)
        first = next((g, w) for g, w in pairs if g != w)
        pytest.fail(f"PostgreSQL wrote {first[0]!r}\nSQLite wrote     {first[1]!r}")
    if flt.until != T0.isoformat():
        assert want, "the filter should match some rows"


async def test_a_child_that_fails_is_reported_not_taken_for_the_end(tmp_path: Path) -> None:
    with pytest.raises(ExportFailed, match="exited with"):
        await run_export(tmp_path / "missing.db", RequestFilter(), "csv", "auto")

"""A summary counts each request once even when a roll-up commits between its two reads.

`summarize` reads the rollup state, plans, then reads every piece in one
statement. A roll-up that commits in between moves the watermark: rows the plan
takes raw are then in the rollups too. The statement reports that and the
summary is re-planned. The roll-up here is made to land exactly there: SQLite
calls the reader's trace callback as the statement starts, before its read
snapshot is taken, and the callback commits a real roll-up on the writer's own
connection.
"""

from __future__ import annotations

from pathlib import Path

from meterproxy.store import backend
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import roll_up
from meterproxy.store.schema import record_to_row
from meterproxy.store.sqlite import connect_sqlite
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import INSERT_REQUEST
from meterproxy.testing import make_record
from meterproxy.usage import Usage


def test_a_roll_up_between_the_plan_and_the_read_is_not_counted_twice(tmp_path: Path) -> None:
    db = str(tmp_path / "m.db")
    writer = backend.connect(db)
    backend.apply_migrations(writer)

    def add(n: int) -> None:
        with writer.transaction():
            records = [make_record(usage=Usage(input_tokens=3, output_tokens=1)) for _ in range(n)]
            writer.executemany(INSERT_REQUEST, [record_to_row(r) for r in records])

    add(50)
    with writer.transaction():
        roll_up(writer)
    add(30)  # above the watermark: the plan reads these raw

    reader = connect_sqlite(db, readonly=True)
    landed: list[int] = []

    def roll_up_now(sql: str) -> None:
        if "UNION ALL" in sql and not landed:
            with writer.transaction():
                landed.append(roll_up(writer))

    reader.raw.set_trace_callback(roll_up_now)
    try:
        totals = summarize(reader, SummaryQuery(RequestFilter(), ["model"])).totals
    finally:
        reader.close()
        writer.close()
    assert landed == [30]  # the roll-up did land between the plan and the read
    assert totals["requests"] == 80 and totals["input_tokens"] == 240

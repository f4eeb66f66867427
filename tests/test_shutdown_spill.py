"""Shutdown with a failing database: the records it cannot take are counted and spilled (issue 14.9).

The database is made full for real (``PRAGMA max_page_count`` on the writer's
own connection: SQLite answers SQLITE_FULL, what a full disk gives), 30
requests are answered meanwhile, and the app is shut down. The writer retries
for half of its close timeout, then: every one of the 30 is counted as dropped
(``/healthz``'s counter and ``meterproxy_writer_dropped_records_total``), the
log says how many and where they went, and they are in a spill file next to
the database. ``meterproxy import spill`` puts them back once the database works,
and a second import adds nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from meterproxy.app_state import METRICS, WRITER
from meterproxy.cli import main
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.schema import record_to_row
from meterproxy.store.spill import insert_spilled, read_spill, write_spill
from meterproxy.store.writer import INSERT_REQUEST
from meterproxy.testing import FakeUpstream, load_fixture, make_record
from meterproxy.usage import Usage
from tests.conftest import ProxyFactory
from tests.helpers.pg import store_on

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


async def test_records_a_failing_disk_refuses_at_shutdown_are_counted_spilled_and_reimported(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.replay(load_fixture("openai_chat_json"))
    proxy = await make_proxy(shutdown_timeout=2)
    sessions = [f"spill-{i}" for i in range(30)]
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{proxy.url}/v1/chat/completions", data=CHAT) as r:
            assert r.status == 200
        await proxy.rows(1)
        writer = proxy.app[WRITER]
        pages = sqlite3.connect(proxy.db).execute("PRAGMA page_count").fetchone()[0]
        assert writer._conn is not None
        writer._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
        for session in sessions:
            headers = {"X-Meter-Session": session}
            async with client.post(f"{proxy.url}/v1/chat/completions", data=CHAT, headers=headers) as r:
                assert r.status == 200
                await r.read()
    metrics = proxy.app[METRICS]
    with caplog.at_level(logging.ERROR):
        await proxy.server.close()  # graceful shutdown: the writer is closed with the disk still full

    # Pages left free inside the file may take the first few rows; every other one is spilled.
    stored = {r[0] for r in sqlite3.connect(proxy.db).execute("SELECT session FROM requests")}
    lost = len(set(sessions) - stored)
    assert lost >= 10 and writer.dropped == writer.spilled == lost
    metrics.refresh(proxy.app)
    assert metrics.registry.get_sample_value("meterproxy_writer_dropped_records_total") == lost
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{lost} record(s) not written" in m for m in messages), messages
    spill = writer.spill_path
    assert spill is not None and spill.parent == proxy.db.parent
    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert sorted(line["session"] for line in lines) == sorted(set(sessions) - stored)

    result = CliRunner().invoke(main, ["import", "spill", str(spill), "--db", str(proxy.db)])
    assert result.exit_code == 0, result.output
    assert f"{lost} record(s) imported, 0 already present" in result.output
    conn = sqlite3.connect(proxy.db)
    rows = conn.execute(
        "SELECT session, input_tokens, cost_pico FROM requests WHERE session LIKE 'spill-%'"
    ).fetchall()
    conn.close()
    assert sorted(r[0] for r in rows) == sorted(sessions) and all(r[1] and r[2] for r in rows)
    again = CliRunner().invoke(main, ["import", "spill", str(spill), "--db", str(proxy.db)])
    assert f"0 record(s) imported, {lost} already present" in again.output


def test_a_file_that_is_not_a_spill_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "x", "model": "gpt-4o"}\n')
    result = CliRunner().invoke(main, ["import", "spill", str(other), "--db", str(tmp_path / "m.db")])
    assert result.exit_code != 0 and "not a meterproxy spill line" in result.output


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_spill_goes_back_as_one_bulk_load_on_either_engine(engine: str, tmp_path: Path) -> None:
    """300 spilled rows (PostgreSQL: ``COPY``, past insert_many's 256-row threshold), 5 of them
    stored already: 295 go in, 5 are counted as present, and a second import adds nothing."""
    with store_on(engine, tmp_path) as db:
        records = [make_record(id=f"spilled-{n:03d}", usage=Usage(input_tokens=n)) for n in range(300)]
        rows = [record_to_row(r) for r in records]
        conn = connect(db)
        try:
            apply_migrations(conn)
            with conn.transaction():
                conn.lock_request_order()
                conn.executemany(INSERT_REQUEST, rows[::60])  # 5 already stored
            spill = write_spill(str(tmp_path / "m.db"), rows)
            assert spill is not None
            assert insert_spilled(conn, read_spill(spill)) == (295, 5)
            assert insert_spilled(conn, read_spill(spill)) == (0, 300)
            stored = conn.execute("SELECT id, input_tokens FROM requests ORDER BY id").fetchall()
        finally:
            conn.close()
    assert [tuple(r) for r in stored] == [(f"spilled-{n:03d}", n) for n in range(300)]

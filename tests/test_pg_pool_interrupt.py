"""A cancel never reaches a pooled PostgreSQL connection after it went back to the pool.

PostgreSQL cancels whatever the server process runs when the cancel arrives, so
a stopped export whose worker had just returned its connection cancelled the
next borrower's query (seen as ``QueryCanceled`` in an unrelated export).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from meterproxy.store.postgres import ReadPool
from tests.helpers.pg import fresh_database, pg_or_skip


@pytest.fixture
def pool() -> object:
    pg_or_skip()
    with fresh_database() as url:
        readers = ReadPool(url, max_size=1)
        try:
            yield readers
        finally:
            readers.close()


def _wait_running(url: str, pid: int) -> None:
    """Until the server reports ``pid`` busy with a statement (deadline 30 s)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            row = watcher.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            if row and row[0] == "active":
                return
            time.sleep(0.01)  # polling the server's own view, with a deadline
    raise AssertionError(f"backend {pid} never ran the statement")


def test_an_interrupted_connection_is_not_lent_again(pool: ReadPool) -> None:
    conn = pool.connection()
    pid = conn.raw.info.backend_pid
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("SELECT pg_sleep(30)").fetchall()
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    _wait_running(pool.url, pid)
    conn.interrupt()
    worker.join(30)
    assert failure and isinstance(failure[0], psycopg.errors.QueryCanceled)
    conn.close()
    again = pool.connection()
    try:
        assert again.raw.info.backend_pid != pid  # a new server process, no cancel pending
        assert again.execute("SELECT 1").fetchone() == (1,)
    finally:
        again.close()


def test_interrupting_a_returned_connection_spares_the_next_borrower(pool: ReadPool) -> None:
    stale = pool.connection()
    pid = stale.raw.info.backend_pid
    stale.close()
    borrower = pool.connection()
    try:
        assert borrower.raw.info.backend_pid == pid  # the same server process, lent again
        result: list[object] = []
        worker = threading.Thread(
            target=lambda: result.append(borrower.execute("SELECT pg_sleep(0.5), 7").fetchone())
        )
        worker.start()
        _wait_running(pool.url, pid)
        stale.interrupt()  # e.g. an export's stop() racing its worker's close()
        worker.join(30)
        assert result and result[0][1] == 7  # type: ignore[index]
    finally:
        borrower.close()

"""The writer batches a burst of records into few transactions; `call` and `close` cut its linger short."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord


def test_a_burst_is_committed_in_few_transactions(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "w.db", linger=0.5)
    batches: list[int] = []
    writer.on_commit(lambda records: batches.append(len(records)))
    writer.start()
    for _ in range(500):
        assert writer.submit(make_record())
    # A call queued after the burst runs after it (in queue order), seeing every row.
    count = writer.call(lambda conn: conn.execute("SELECT count(*) FROM requests").fetchone()[0])
    assert count.result(timeout=10) == 500
    assert writer.close()
    assert sum(batches) == 500
    assert len(batches) <= 3, batches  # one transaction per ~handful of rows would be hundreds
    conn = sqlite3.connect(tmp_path / "w.db")
    assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 500
    conn.close()


def test_close_flushes_a_lingering_batch(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "w.db", linger=30.0)  # close must not wait 30 s for the linger
    seen: list[RequestRecord] = []
    writer.on_commit(seen.extend)
    writer.start()
    records = [make_record() for _ in range(3)]
    for r in records:
        writer.submit(r)
    # call() cuts the linger short too (durability="strict" waits on one): not 30 s.
    assert writer.call(lambda conn: None).result(timeout=10) is None
    assert writer.close(timeout=10)
    assert [r.id for r in seen] == [r.id for r in records]


def test_a_small_batch_written_in_gil_slices_is_still_one_transaction(tmp_path: Path) -> None:
    """Batches up to _SLICED_BATCH_MAX are inserted 8 rows at a time (GIL yields between), atomically."""
    writer = StoreWriter(tmp_path / "w.db", linger=0.5)
    batches: list[list[str]] = []
    writer.on_commit(lambda records: batches.append([r.id for r in records]))
    writer.start()
    records = [make_record() for _ in range(101)]  # 13 slices, the last one short
    for r in records:
        writer.submit(r)
    assert writer.close(timeout=10)
    assert batches == [[r.id for r in records]]
    conn = sqlite3.connect(tmp_path / "w.db")
    ids = [row[0] for row in conn.execute("SELECT id FROM requests ORDER BY rowid")]
    conn.close()
    assert ids == [r.id for r in records]


def test_queue_depth_counts_the_batch_in_hand_until_it_is_committed(tmp_path: Path) -> None:
    """health().queue_depth == 0 means every accepted record is in the database.

    The thread takes a batch off the queue before it commits it; a depth of the queue alone read 0
    while that batch was still unwritten (CI saw /healthz say ok with 20 rows not yet committed).
    """
    import threading

    writer = StoreWriter(tmp_path / "w.db", linger=0.0)
    taken = threading.Event()
    release = threading.Event()

    def hold(record: RequestRecord) -> None:  # runs on the writer thread, batch already dequeued
        taken.set()
        assert release.wait(30)

    writer.prepare = hold
    writer.start()
    try:
        assert writer.submit(make_record())
        assert taken.wait(30)
        assert writer.depth == 0  # off the queue...
        assert writer.health().queue_depth == 1  # ...but not durable
        assert writer.submit(make_record())
        assert writer.health().queue_depth == 2
    finally:
        release.set()
    assert writer.call(lambda conn: None).result(timeout=10) is None
    assert writer.health().queue_depth == 0
    conn = sqlite3.connect(tmp_path / "w.db")
    assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 2
    conn.close()
    assert writer.close(timeout=10)

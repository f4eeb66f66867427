"""The single writer: one thread owns the SQLite write connection.

The event loop never touches the database. It hands records to `submit`, which
only puts them on a bounded queue (non-blocking, O(1)). The writer thread takes
whatever is queued, up to `batch_max` at a time, and commits it in one
transaction. After the first record of a batch it lingers ``linger`` seconds
(default 20 ms) for more: one transaction per batch instead of one per record
costs the proxy's core far less CPU (and the event loop fewer GIL hand-offs, as
a producer only wakes the writer once per batch), and rows still appear well
within the 200 ms a reader may expect. `call` (and `close`) cut the linger
short, so ``durability="strict"`` waits for a commit, not for the linger. Other features run their own writes
on the same thread with `call` (budgets' outbox, imports), so SQLite never sees
two writers from one process.

When the database fails (locked, disk full, read-only file) the batch is kept
and retried with backoff; records keep queueing up to ``queue_max`` and past that
are counted as dropped rather than growing memory without bound. `health`
reports the fault until a commit succeeds again.

`close` puts a sentinel on the queue and waits: everything submitted before it
is committed (that is what a clean SIGTERM relies on). If the database is
failing then, the writer retries for half of close's timeout at most; what it
still cannot commit is spilled to a file (`meterproxy.store.spill`, re-imported
with ``meterproxy import spill``), counted in ``dropped`` and logged with its
count, never lost silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.db import Db, db_errors, placeholders
from meterproxy.store.schema import COLUMNS, record_to_row
from meterproxy.store.spill import write_spill
from meterproxy.usage import RequestRecord

__all__ = ["StoreWriter", "WriterHealth"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
#: One record; a record already stored is left as it is (``user`` is reserved in PostgreSQL).
INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in COLUMNS)}) "
    f"VALUES ({placeholders(len(COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)


@dataclass(slots=True)
class _Call:
    fn: Callable[[Db], Any]
    future: Future[Any]


@dataclass(slots=True)
class WriterHealth:
    ok: bool
    #: Records not yet durable: queued, or in the batch being written or retried.
    queue_depth: int
    written: int
    dropped: int
    last_error: str | None
    last_commit_age_s: float | None


class StoreWriter:
    def __init__(
        self,
        path: str | Path,
        *,
        queue_max: int = 100_000,
        batch_max: int = 5_000,
        retry_max_s: float = 5.0,
        linger: float = 0.02,
    ) -> None:
        self.path = str(path)
        # Unbounded as a queue so that `call` never blocks the event loop; records
        # are bounded by `submit` itself (``queue_max``). `queue.SimpleQueue` is C: a put
        # from the loop and a get on this thread take no Python-level lock or condition
        # (`queue.Queue` costs ~1.5 µs a side per record; `bench/README.md`, step 4).
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._retry_max_s = retry_max_s
        self._linger = linger
        # Set by `call` and `close` (after their item is queued): stop lingering, write now.
        self._flush_now = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Db | None = None
        self.written = 0
        self.dropped = 0
        # Records accepted by `submit` (counted on the submitting thread) and records settled,
        # committed or given up (counted on the writer thread): one writer per counter, so no lock.
        # Their difference is what is not durable yet, the batch in hand included.
        self._accepted = 0
        self._settled = 0
        self.last_error: str | None = None
        self._last_commit: float | None = None
        self._listeners: list[Callable[[list[RequestRecord]], None]] = []
        #: Called on this thread with each record just before its row is made (estimate_usage fills
        #: ``record.estimate`` here, off the event loop); a failure is logged, the row still written.
        self.prepare: Callable[[RequestRecord], None] | None = None
        # Set by `close`: past this monotonic time a failing write is spilled, not retried.
        self._give_up_at: float | None = None
        #: Records spilled to a file at shutdown (also counted in ``dropped``), and where.
        self.spilled = 0
        self.spill_path: Path | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Open the database and apply migrations (raising on a broken file), then start."""
        conn = connect(self.path)
        apply_migrations(conn)
        if conn.dialect.in_process:
            # SQLite keeps a statement journal for each multi-row INSERT (`SqliteDb.insert_many`),
            # and spills it to a temporary file past 64 KiB: ~1.3 extra pwrite per row, three times
            # the writer's system time (bench/README.md, issue 21 "step 5"). In memory it stays
            # small (one 8-row slice's pages), as do the roll-up's sort and temporary table here.
            conn.execute("PRAGMA temp_store=MEMORY")
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="meterproxy-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> bool:
        """Commit everything submitted so far, then stop. False if it timed out.

        A database that keeps failing is retried for half of ``timeout``; the
        records it still refuses are spilled to a file and counted as dropped.
        """
        if self._thread is None:
            return True
        self._give_up_at = time.monotonic() + (timeout / 2 if timeout is not None else 15.0)
        self._queue.put(_STOP)
        self._flush_now.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if not alive:
            self._thread = None
        else:
            # The thread is stuck (a lock wait, a hung disk): spill what it never took.
            left = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, RequestRecord):
                    left.append(item)
            self._give_up(left, "the writer did not finish in time")
        if self.dropped:
            log.error(
                "shutdown: %d record(s) not written to the database; %d spilled to %s "
                "(meterproxy import spill FILE re-imports them)",
                self.dropped,
                self.spilled,
                self.spill_path or "nowhere (no spill file could be written)",
            )
        return not alive

    def _give_up(self, records: list[RequestRecord], why: str) -> None:
        """Records the database will not take before shutdown: to a spill file, counted as dropped."""
        if not records:
            return
        self.dropped += len(records)
        self._settled += len(records)
        path = write_spill(self.path, (record_to_row(r) for r in records))
        if path is not None:
            self.spilled += len(records)
            self.spill_path = path
        log.error("%s: %d record(s) spilled to %s", why, len(records), path or "nowhere")

    def on_commit(self, listener: Callable[[list[RequestRecord]], None]) -> None:
        """Call ``listener`` (on the writer thread) with each batch once it is durable."""
        self._listeners.append(listener)

    # -- producers (event loop) -------------------------------------------
    def submit(self, record: RequestRecord) -> bool:
        if self._queue.qsize() >= self._queue_max:
            self.dropped += 1
            log.error("writer queue full (%d): record %s dropped", self._queue_max, record.id)
            return False
        self._accepted += 1
        self._queue.put_nowait(record)
        return True

    def call(self, fn: Callable[[Db], T]) -> Future[T]:
        """Run ``fn(conn)`` on the writer thread, in its own transaction."""
        future: Future[T] = Future()
        self._queue.put(_Call(fn, future))
        self._flush_now.set()
        return future

    @property
    def depth(self) -> int:
        """Items on the queue (records and calls), not counting the batch the thread holds."""
        return self._queue.qsize()

    @property
    def pending(self) -> int:
        """Records accepted and not yet committed nor given up: queued or in the batch being written.

        This, not `depth`, is what "nothing left to write" means: the thread takes a batch off the
        queue before it commits it (and holds it while it retries a failing database).
        """
        return max(self._accepted - self._settled, 0)

    def health(self) -> WriterHealth:
        age = None if self._last_commit is None else time.monotonic() - self._last_commit
        return WriterHealth(
            ok=self.last_error is None,
            queue_depth=self.pending,
            written=self.written,
            dropped=self.dropped,
            last_error=self.last_error,
            last_commit_age_s=age,
        )

    # -- the thread --------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if (
                self._linger > 0
                and item is not _STOP
                and not isinstance(item, _Call)
                and self._queue.qsize() < self._batch_max
            ):
                self._flush_now.wait(self._linger)
                self._flush_now.clear()
            records: list[RequestRecord] = []
            calls: list[_Call] = []
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Call):
                    calls.append(item)
                else:
                    records.append(item)
                if stopping or len(records) >= self._batch_max:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if records:
                self._write_records(records)
            for call in calls:
                self._run_call(call)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _write_records(self, records: list[RequestRecord]) -> None:
        if self.prepare is not None:
            for record in records:
                try:
                    self.prepare(record)
                except Exception:
                    log.exception("preparing record %s failed", record.id)
        rows = [record_to_row(r) for part in _gil_slices(records) for r in part]
        delay = 0.05
        assert self._conn is not None
        while True:
            try:
                with self._conn.transaction():
                    self._conn.lock_request_order()
                    _insert_rows(self._conn, rows)
                break
            except db_errors() as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("database write failed (%d rows kept, retrying): %s", len(rows), exc)
                give_up_at = self._give_up_at
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    self._give_up(records, "shutting down with the database failing")
                    return
                if give_up_at is not None:  # closing: never sleep past the point of giving up
                    delay = min(delay, max(give_up_at - time.monotonic(), 0.0) + 0.001)
                time.sleep(delay)
                delay = min(delay * 2, self._retry_max_s * 1.01)
                self._reopen_if_broken()
        self.written += len(rows)
        self._settled += len(rows)
        self.last_error = None
        self._last_commit = time.monotonic()
        for listener in self._listeners:
            try:
                listener(records)
            except Exception:
                log.exception("commit listener failed")

    def _run_call(self, call: _Call) -> None:
        assert self._conn is not None
        if not call.future.set_running_or_notify_cancel():
            return  # the caller gave up (e.g. a task cancelled at shutdown): nothing to run or report
        for attempt in range(_CALL_RETRIES + 1):
            try:
                with self._conn.transaction():
                    result = call.fn(self._conn)
                call.future.set_result(result)
                return
            except BaseException as exc:
                # PostgreSQL: a concurrent replica's transaction won; the rolled-back work is rerun
                # (SQLite never gets here: BEGIN IMMEDIATE already serialized the writers).
                if attempt < _CALL_RETRIES and self._conn.is_serialization_failure(exc):
                    time.sleep(0.005 * (attempt + 1))
                    continue
                self._reopen_if_broken()
                call.future.set_exception(exc)
                return

    def _reopen_if_broken(self) -> None:
        """PostgreSQL: a connection the server dropped is replaced (SQLite connections don't break)."""
        if self._conn is not None and self._conn.broken:
            try:
                self._conn.close()
            except Exception:
                pass
            try:
                self._conn = connect(self.path)
            except db_errors() as exc:
                log.error("database reconnect failed: %s", exc)


_CALL_RETRIES = 20
#: Rows handled between two GIL releases. The event loop shares the GIL with this thread, and
#: a thread that gives the GIL up briefly (each sqlite3_step does) takes it straight back
#: before the waiting loop thread wakes, so without explicit yields the loop can wait out a
#: whole batch: measured (`bench/writer_lag.py`), a loop ticking every 1 ms beside records at
#: 4,000/s saw p99 lag 1.1-2.4 ms, and 0.5 ms with yields every 8 rows.
_ROWS_PER_SLICE = 8
#: Past this many records a batch is a backlog (a stalled disk, a burst): it is written in one
#: go, because every yield costs the writer a GIL round trip and a backlog must drain fast.
_SLICED_BATCH_MAX = 256


def _gil_slices(items: list[T]) -> Iterator[list[T]]:
    """A batch in slices of `_ROWS_PER_SLICE`, the GIL released between two; a backlog whole."""
    if len(items) > _SLICED_BATCH_MAX:
        yield items
        return
    for i in range(0, len(items), _ROWS_PER_SLICE):
        if i:
            time.sleep(0)  # release the GIL: a waiting loop thread takes it now, not in 5 ms
        yield items[i : i + _ROWS_PER_SLICE]


def _insert_rows(conn: Db, rows: list[tuple[Any, ...]]) -> None:
    """The batch into ``requests``, ignoring ids already stored (a batch retried after a lost commit).

    An engine that runs in this process (SQLite) gets small slices with the GIL
    released between them (see `_gil_slices`); PostgreSQL gets the batch whole.
    """
    for part in _gil_slices(rows) if conn.dialect.in_process else [rows]:
        conn.insert_many("requests", COLUMNS, part, key="id")

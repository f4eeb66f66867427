"""The SQLite export's child process: formats rows in SQLite and writes the bytes, in order, to stdout.

Run by `meterproxy.store.export_process` as ``python -I export_child.py`` with
a JSON job on stdin (see `Job`); it imports nothing from meterproxy, so it
starts in tens of milliseconds. Why a process of its own:

- **A current SQLite.** Formatting is SQLite's ``printf``/``json_object`` in C,
  and SQLite 3.54 (shipped inside the ``apsw`` wheel) does it in about half the
  CPU of Debian 12's 3.40 (floats to text were rewritten in 3.43). Two copies of
  SQLite must never open the same database in one process: POSIX locks are per
  process, so each copy would ignore the other's WAL read marks and could drop
  its locks on ``close()`` (sqlite.org/howtocorrupt.html, "multiple copies of
  SQLite"). In a process of its own, apsw is just another SQLite client.
  Without apsw the child uses the standard ``sqlite3`` module: same SQL, same
  bytes (`tests/test_export.py` checks both), only slower.
- **No GIL, no event loop in the way.** The proxy's loop only copies finished
  chunks from a pipe to the socket.

Pipeline: a planner thread cuts the range into slices of about ``slice_rows``
rows (``ts`` boundaries found by ``LIMIT 1 OFFSET n`` on an index, so no row is
read twice) and deals them round-robin to ``workers`` threads. Each worker runs,
per slice, one query whose single value is the whole slice already formatted
(``group_concat`` over the ordered lines, cast to a BLOB: no Python object per
row, no decode/encode) and puts it on its own queue. The main thread takes the
queues in slice order and writes to stdout. Every queue is small and bounded, and
a write to a full pipe blocks, so a slow client slows the reading: memory stays
at a few slices. Any failure exits non-zero with the reason on stderr; the
parent then cuts the HTTP response instead of ending it cleanly.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypedDict

__all__ = ["Job", "main", "run"]


class Job(TypedDict):
    db: str
    #: A SQL expression giving one output line (terminator included) for a row of ``requests``.
    line: str
    #: The time range, ``[since, until)``; None: open.
    since: str | None
    until: str | None
    #: The other filters (``RequestFilter.where`` without the range): a SQL condition with
    #: placeholders ``$1..$n`` and the n parameters.
    where: str
    params: list[Any]
    workers: int
    slice_rows: int
    #: ``"auto"`` (apsw if installed, else sqlite3), ``"apsw"`` or ``"sqlite3"``.
    driver: str


Query = Callable[[str, dict[str, Any]], Iterator[tuple[Any, ...]]]

_configured = threading.Lock()


def _configure(apsw: Any) -> None:
    """Before the first connection: no global allocator statistics (a mutex every malloc takes)."""
    with _configured:
        try:
            apsw.config(apsw.SQLITE_CONFIG_MEMSTATUS, 0)
        except apsw.MisuseError:  # SQLite is already initialised: keep its settings
            pass


def _connect(db: str, driver: str) -> tuple[Query, Callable[[], None]]:
    """(run a query, close) on a new read-only connection."""
    uri = f"file:{db}?mode=ro"
    if driver in ("auto", "apsw"):
        try:
            import apsw
        except ImportError:
            if driver == "apsw":
                raise
        else:
            _configure(apsw)
            conn = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
            conn.set_busy_timeout(5000)
            return (lambda sql, params: iter(conn.execute(sql, params))), conn.close
    std = sqlite3.connect(uri, uri=True, check_same_thread=False)
    std.execute("PRAGMA busy_timeout=5000")
    return (lambda sql, params: iter(std.execute(sql, params))), std.close


class _Params:
    """The job's parameters, then this process's own: ``p(value)`` gives its ``$n`` placeholder."""

    def __init__(self, values: list[Any]) -> None:
        self.values = list(values)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def bound(self) -> dict[str, Any]:
        """``$n`` is SQLite's parameter named ``n``: bind by name (either driver)."""
        return {str(i): v for i, v in enumerate(self.values, 1)}


def _range(p: _Params, lo: str | None, hi: str | None) -> str:
    """``ts`` conditions for ``[lo, hi)``: one bound each side, so the index range is the slice."""
    cond = []
    if lo is not None:
        cond.append(f"ts >= {p(lo)}")
    if hi is not None:
        cond.append(f"ts < {p(hi)}")
    return " AND ".join(cond) or "1 = 1"


def _bounds(query: Query, job: Job) -> Iterator[tuple[str | None, str | None]]:
    """Consecutive ``[lo, hi)`` ts ranges of about ``slice_rows`` matching rows (None: open end)."""
    where, until = job["where"], job["until"]
    p = _Params(job["params"])
    cond = _range(p, job["since"], until)
    first = next(query(f"SELECT min(ts) FROM requests WHERE ({where}) AND {cond}", p.bound()))[0]
    if first is None:
        return
    lo: str = first
    start = job["since"]
    while True:
        p = _Params(job["params"])
        cond = _range(p, lo, until)
        offset = p(job["slice_rows"])
        nth = f"SELECT ts FROM requests WHERE ({where}) AND {cond} ORDER BY ts LIMIT 1 OFFSET {offset}"
        row = next(query(nth, p.bound()), None)
        if row is None:
            yield start, until
            return
        hi: str | None = row[0]
        if hi == lo:  # more than slice_rows rows share one ts: this slice takes them all
            p = _Params(job["params"])
            after = (
                f"SELECT min(ts) FROM requests WHERE ({where}) AND ts > {p(lo)} AND {_range(p, None, until)}"
            )
            hi = next(query(after, p.bound()))[0]
            if hi is None:
                yield start, until
                return
        assert hi is not None
        yield start, hi
        start = lo = hi


def _slice_sql(job: Job, lo: str | None, hi: str | None) -> tuple[str, dict[str, Any]]:
    p = _Params(job["params"])
    cond = _range(p, lo, hi)
    # The subquery's ORDER BY is kept: SQLite does not flatten an ordered subquery into an
    # aggregate, so group_concat sees the lines in (ts, id) order (tests check ties too).
    sql = (
        f"SELECT CAST(group_concat(line, '') AS BLOB) FROM "
        f"(SELECT {job['line']} AS line FROM requests WHERE ({job['where']}) AND {cond} ORDER BY ts, id)"
    )
    return sql, p.bound()


class _Stop(Exception):
    """The main thread gave up (stdout closed, or another thread failed)."""


def run(job: Job, write: Callable[[bytes], None]) -> None:
    """Format the export and hand it, in order, to ``write``. Raises what any thread raised."""
    workers = max(1, job["workers"])
    todo: list[queue.Queue[tuple[str | None, str | None] | None]] = [queue.Queue(4) for _ in range(workers)]
    done: list[queue.Queue[bytes | None]] = [queue.Queue(2) for _ in range(workers)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue[Any], item: Any) -> None:
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                continue
        raise _Stop

    def get(q: queue.Queue[Any]) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stop

    def guarded(body: Callable[[Query], None]) -> Callable[[], None]:
        def target() -> None:
            close = None
            try:
                query, close = _connect(job["db"], job["driver"])
                body(query)
            except _Stop:
                pass
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                if close is not None:
                    close()

        return target

    def plan(query: Query) -> None:
        for n, bounds in enumerate(_bounds(query, job)):
            put(todo[n % workers], bounds)
        for q in todo:
            put(q, None)

    def work(i: int, query: Query) -> None:
        while (bounds := get(todo[i])) is not None:
            sql, bound = _slice_sql(job, *bounds)
            put(done[i], next(query(sql, bound))[0] or b"")
        put(done[i], None)

    threads = [threading.Thread(target=guarded(plan), name="export-plan", daemon=True)]
    threads += [
        threading.Thread(target=guarded(functools.partial(work, i)), name=f"export-{i}", daemon=True)
        for i in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        n = 0
        # Worker n % workers has slice n; None from it means slice n does not exist: the end.
        while (item := get(done[n % workers])) is not None:
            write(item)
            n += 1
    except _Stop:
        raise errors[0] from None
    finally:
        stop.set()
    for t in threads:
        t.join()


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB (Linux): 16x fewer blocked writes and wake-ups on both sides."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):  # not Linux, not a pipe, or over the system's limit
        pass


def main() -> int:
    job: Job = json.loads(sys.stdin.buffer.read())
    _widen_pipe(1)
    try:
        run(job, _write_all)
    except BrokenPipeError:  # the parent stopped reading: the client hung up
        return 1
    except BaseException as exc:
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

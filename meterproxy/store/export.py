"""Export rows as CSV or JSON Lines text formatted by the database itself: line formats, PostgreSQL path.

An export of a month can be millions of rows. Formatting each row in Python
(csv.writer, json.dumps) costs more than reading it, so the database builds
each output line in C: for CSV one ``printf`` per row that quotes every text
field (``%w``: RFC 4180, ``"`` doubled) and leaves numbers bare (a single printf
is about three times faster than the same line built with ``||``, which copies
the growing string at every step); for JSONL ``json_object``, with the exact
cost text spliced in as a JSON number (``json(cost_usd)``), so costs keep every
digit.

One engine per database, each formatting in the database's own SQL:

- SQLite: `LINE_SQL`, run by the export's child process
  (``store/export_child.py``, started by ``store/export_process.py``), which may
  run a newer SQLite than this process: it spells floats out as ``%!.15g``
  (what SQLite 3.40 wrote for a bare REAL; 3.43+ writes 17 digits) so the bytes
  do not depend on the library.
- PostgreSQL: `PG_LINE_SQL` (``||``, ``to_json`` for text, floats spelled as
  SQLite spells them: `_pg_real`), the same bytes as SQLite's lines (tested on
  both engines), run by `SlicedExport`: threads in this process, hour-long
  `time_slices`, each slice one `pg_slice` value read with ``COPY (SELECT
  string_agg(...)) TO STDOUT (FORMAT binary)`` (`Db.bulk_read`): the bytes
  arrive as the server built them, one message per slice. Not ``COPY`` of one
  row per line: text COPY escapes the lines' CR, LF and backslashes (to undo
  here), CSV COPY cannot end lines with CRLF, and either is one message per row
  (bench/README.md, "PostgreSQL store's export").

Text cells of the CSV that a spreadsheet would evaluate as a formula (starting
with ``= + - @``, tab or CR) get a leading ``'`` (`meterproxy.csv_cells`);
JSON Lines keep the text exactly.

Columns are `EXPORT_COLUMNS`: the API's request fields, in a fixed order (a
contract for spreadsheets and finance scripts). Internal columns
(``cost_pico``, ``extra``, ``usage_injected``) are not exported; prompt text is
never stored, so never exported. Booleans are ``true``/``false`` in both formats.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from datetime import timedelta

from meterproxy.csv_cells import safe_cell_sql
from meterproxy.store.db import Db, Params
from meterproxy.store.queries import API_FIELDS, RequestFilter
from meterproxy.timestamps import format_ts, parse_ts

__all__ = [
    "EXPORT_COLUMNS",
    "FORMATS",
    "LINE_SQL",
    "PG_LINE_SQL",
    "SlicedExport",
    "csv_header",
    "pg_slice",
    "time_slices",
]

EXPORT_COLUMNS: list[str] = list(API_FIELDS)
FORMATS = ("csv", "jsonl")

_INTEGER = {
    "status",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "audio_input_tokens",
    "audio_cache_read_tokens",
    "image_input_tokens",
    "audio_output_tokens",
    "image_output_tokens",
    "duration_ms",
    "ttfb_ms",
    "upstream_ms",
}
_BOOL = {"streamed", "client_disconnected"}
_NUMBER_TEXT = {
    "cost_usd",
    "provider_cost_usd",
    "estimated_cost_usd",
}  # exact decimal text, a bare number in CSV
_JSON_TEXT = {"tags"}


def _csv_field(col: str) -> tuple[str, str]:
    """(printf conversion, argument) for one CSV field, in SQLite."""
    q = f'"{col}"'
    if col in _BOOL:
        return "%s", f"CASE WHEN {q} <> 0 THEN 'true' ELSE 'false' END"
    if col in _INTEGER or col in _NUMBER_TEXT:
        return "%s", f"COALESCE({q}, '')"
    # %w doubles every double quote: RFC 4180 quoting in C. NULL and '' both give "".
    # Text may come from clients: a cell a spreadsheet would run gets a leading quote.
    return '"%w"', f"COALESCE({safe_cell_sql(q)}, '')"


def _json_expr(col: str) -> str:
    q = f'"{col}"'
    if col in _BOOL:
        return f"json(CASE WHEN {q} <> 0 THEN 'true' ELSE 'false' END)"
    if col in _NUMBER_TEXT or col in _JSON_TEXT:
        return f"json({q})"
    return q


# Floats as SQLite 3.40 wrote them (``%!.15g``: 15 significant digits, ``.0`` kept). SQLite
# 3.43+ writes up to 17 digits for a bare REAL, so the text would depend on the library that
# formats it (the child process may use a newer one than the proxy): spell the format out.
_REAL = {"duration_ms", "ttfb_ms", "upstream_ms"}


def _sqlite_csv_field(col: str) -> tuple[str, str]:
    if col in _REAL:
        return "%s", f"CASE WHEN \"{col}\" IS NULL THEN '' ELSE printf('%!.15g', \"{col}\") END"
    return _csv_field(col)


def _sqlite_json_expr(col: str) -> str:
    if col in _REAL:
        return f'CASE WHEN "{col}" IS NULL THEN NULL ELSE json(printf(\'%!.15g\', "{col}")) END'
    return _json_expr(col)


_F = [_sqlite_csv_field(c) for c in EXPORT_COLUMNS]
#: One output line per row, terminator included, identical whichever SQLite version formats it.
LINE_SQL = {
    "csv": f"printf('{','.join(f for f, _ in _F)}\r\n', {', '.join(a for _, a in _F)})",
    "jsonl": "(json_object("
    + ", ".join(f"'{c}', {_sqlite_json_expr(c)}" for c in EXPORT_COLUMNS)
    + ") || char(10))",
}


def csv_header() -> str:
    return ",".join(EXPORT_COLUMNS) + "\r\n"


def _pg_text_name(q: str) -> str:
    return f'"{q.strip(chr(34))}__text"'


def _pg_real(q: str) -> str:
    """PostgreSQL: a float's text as SQLite's ``printf('%!.15g', x)`` writes it (NULL stays NULL).

    ``CAST(x AS numeric)`` keeps 15 significant digits (PostgreSQL converts with
    the C library's ``%.15g``), and its text is the fixed notation; ``%!.15g``
    adds ``.0`` to a whole number, and writes ``d.ddde+XX`` below 1e-4 and from
    1e15. The text is computed once per row (`_PG_ROWS`), and a cheap float test
    keeps the common case to it; only values near those bounds take the exact
    (numeric, ``log``) branch. Equal to SQLite's
    text except on exact decimal ties at the 16th digit (SQLite rounds half away
    from zero, the C library half to even: a tie needs a double whose whole
    expansion is 16 digits, which a measured duration is not) and beyond 1e100,
    where SQLite's own last digit is off.
    """
    n = f"CAST({q} AS numeric)"
    t = _pg_text_name(q)  # CAST(n AS text), computed once per row by `_PG_ROWS`
    fixed = f"CASE WHEN strpos({t}, '.') = 0 THEN {t} || '.0' ELSE {t} END"
    e = f"CAST(floor(log(abs({n}))) AS int)"
    mantissa = (
        f"CAST(trim_scale(CASE WHEN {e} >= 0 THEN {n} / power(CAST(10 AS numeric), {e}) "
        f"ELSE {n} * power(CAST(10 AS numeric), -{e}) END) AS text)"
    )
    exponent = (
        f"CASE WHEN strpos({mantissa}, '.') = 0 THEN {mantissa} || '.0' ELSE {mantissa} END || 'e' || "
        f"CASE WHEN {e} < 0 THEN '-' ELSE '+' END || CASE WHEN abs({e}) < 10 THEN '0' ELSE '' END || "
        f"CAST(abs({e}) AS text)"
    )
    return (
        f"CASE WHEN {q} IS NULL THEN NULL WHEN {q} = 0 THEN '0.0' "
        f"WHEN abs({q}) >= 9.9999999999e14 OR abs({q}) < 1.00000000001e-4 THEN "
        f"CASE WHEN abs({n}) >= 1e15 OR abs({n}) < 1e-4 THEN {exponent} ELSE {fixed} END "
        f"ELSE {fixed} END"
    )


def _pg_csv_field(col: str) -> str:
    q = f'"{col}"'
    if col in _BOOL:
        return f"CASE WHEN {q} <> 0 THEN 'true' ELSE 'false' END"
    if col in _REAL:
        return f"COALESCE({_pg_real(q)}, '')"
    if col in _INTEGER or col in _NUMBER_TEXT:
        return f"COALESCE(CAST({q} AS text), '')"
    return f"'\"' || replace(COALESCE({safe_cell_sql(q)}, ''), '\"', '\"\"') || '\"'"


def _pg_json_value(col: str) -> str:
    """One JSON value as SQLite's ``json_object`` writes it (``to_json`` escapes text the same way)."""
    q = f'"{col}"'
    if col in _BOOL:
        return f"CASE WHEN {q} <> 0 THEN 'true' ELSE 'false' END"
    if col in _REAL:
        return f"COALESCE({_pg_real(q)}, 'null')"
    if col in _NUMBER_TEXT or col in _JSON_TEXT:  # stored as JSON text already (tags: compact)
        return f"COALESCE({q}, 'null')"
    if col in _INTEGER:
        return f"COALESCE(CAST({q} AS text), 'null')"
    return f"COALESCE(CAST(to_json({q}) AS text), 'null')"


#: The same lines, byte for byte, in PostgreSQL's SQL, terminator included: JSON is spelled out
#: (``json_build_object`` spaces its separators) and floats as SQLite writes them (`_pg_real`).
PG_LINE_SQL = {
    "csv": " || ',' || ".join(_pg_csv_field(c) for c in EXPORT_COLUMNS) + " || E'\\r\\n'",
    "jsonl": "'{' || "
    + " || ',' || ".join(f"'\"{c}\":' || {_pg_json_value(c)}" for c in EXPORT_COLUMNS)
    + " || E'}\\n'",
}


#: The rows a slice formats, with each float's 15-digit text computed once (``OFFSET 0`` keeps
#: the planner from folding the subquery into the line, which would convert every float twice).
_PG_ROWS = (
    "(SELECT *, "
    + ", ".join(f'CAST(CAST("{c}" AS numeric) AS text) AS {_pg_text_name(c)}' for c in sorted(_REAL))
    + " FROM requests WHERE {where} OFFSET 0) AS requests"
)


def pg_slice(conn: Db, flt: RequestFilter, fmt: str) -> bytes:
    """PostgreSQL: one slice as one value, ``string_agg`` of the ordered lines built in the server,
    read with ``COPY ... TO STDOUT`` in binary (`Db.bulk_read`): its bytes as the server holds them.

    One round trip and one value per slice, instead of a Python row object per row.
    """

    def select(p: Params) -> str:
        where = flt.where(p, conn.dialect)
        return (
            f"SELECT string_agg(line, '' ORDER BY ts, id) FROM "
            f"(SELECT {PG_LINE_SQL[fmt]} AS line, ts, id FROM {_PG_ROWS.format(where=where)}) AS lines"
        )

    return b"".join(conn.bulk_read(select))


def time_slices(
    conn: Db, since: str | None, until: str | None, width: timedelta = timedelta(hours=6)
) -> list[tuple[str, str]]:
    """Cut ``[since, until)`` (open ends: the stored range) into consecutive time slices."""
    lo, hi = conn.execute("SELECT min(ts), max(ts) FROM requests").fetchone()
    if lo is None:
        return []
    start = max(since, lo) if since else lo
    end = min(until, hi + "~") if until else hi + "~"  # "~" sorts after every ts: hi is included
    if start >= end:
        return []
    at = parse_ts(start).replace(minute=0, second=0, microsecond=0)
    at -= timedelta(hours=at.hour % max(1, int(width.total_seconds() // 3600)))
    slices: list[tuple[str, str]] = []
    lower = start
    while True:
        at += width
        upper = format_ts(at)
        if upper >= end:
            slices.append((lower, end))
            return slices
        slices.append((lower, upper))
        lower = upper


class SlicedExport:
    """PostgreSQL: the export in order, ``workers`` threads fetching alternate time slices.

    Each slice is one `pg_slice` value, formatted by the server. Worker ``i``
    takes slices ``i, i+workers, ...`` on its own pooled connection and puts
    them on its own small queue (``depth`` slices: memory stays bounded);
    `next_chunk` reads the queues in slice order, so the output is exactly the
    single-query order (ts, id). (SQLite exports run in a child process instead:
    ``store/export_process.py``.)
    `close` stops the workers (a client that hung up) and closes their connections.
    """

    def __init__(
        self,
        connect: Callable[[], Db],
        flt: RequestFilter,
        fmt: str,
        slices: list[tuple[str, str]],
        *,
        workers: int = 2,
        depth: int = 2,
    ) -> None:
        self._slices = slices
        self._stop = threading.Event()
        self._queues: list[queue.Queue[bytes | BaseException | None]] = [
            queue.Queue(maxsize=depth) for _ in range(max(1, workers))
        ]
        self._next = 0
        self._conns: list[Db] = []
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(i, connect, flt, fmt),
                name=f"meterproxy-export-{i}",
                daemon=True,
            )
            for i in range(len(self._queues))
        ]
        for thread in self._threads:
            thread.start()

    def _put(self, q: queue.Queue[bytes | BaseException | None], item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, index: int, connect: Callable[[], Db], flt: RequestFilter, fmt: str) -> None:
        q = self._queues[index]
        conn: Db | None = None
        try:
            conn = connect()
            self._conns.append(conn)
            for since, until in self._slices[index :: len(self._queues)]:
                chunk = pg_slice(conn, dataclasses.replace(flt, since=since, until=until), fmt)
                if chunk and not self._put(q, chunk):
                    return
                if not self._put(q, None):  # end of this slice
                    return
        except BaseException as exc:
            self._put(q, exc)
        finally:
            if conn is not None:
                conn.close()

    def next_chunk(self) -> bytes | None:
        """The next piece of output (blocking), or None when the export is complete."""
        while self._next < len(self._slices):
            try:
                item = self._queues[self._next % len(self._queues)].get(timeout=0.1)
            except queue.Empty:
                # A reader blocked here must not outlive `close` (a client that hung up):
                # it would hold a loop executor thread, and shutdown would wait forever.
                if self._stop.is_set():
                    return None
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._next += 1
                continue
            return item
        return None

    def stop(self) -> None:
        """Tell the workers to stop (non-blocking: safe to call from the event loop)."""
        self._stop.set()
        # A worker may be deep inside one large batch; interrupt its query rather than wait.
        for conn in list(self._conns):
            try:
                conn.interrupt()
            except Exception:  # a closed connection needs no interrupt
                pass

    def close(self) -> None:
        """Stop the workers and wait (bounded) for them to exit; this blocks."""
        self.stop()
        for thread in self._threads:
            thread.join(timeout=5)

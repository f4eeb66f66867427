"""Summaries: totals and groups over a time range, from rollups where they can answer, raw rows elsewhere.

`summarize` answers one `SummaryQuery` (a `RequestFilter`, up to two group-by
dimensions, a time zone for calendar buckets) with ONE statement, so the
rollup watermark, the rollup tables and the raw rows are one snapshot and
every stored request counts exactly once:

- raw rows above the watermark (not rolled up yet: the last few seconds) are
  read directly, by rowid;
- below the watermark the range ``[since, until)`` is cut into pieces: the
  partial hours at either end come from raw rows, whole UTC days from
  ``rollup_day`` (when no hour bucket or non-UTC calendar is asked for), and
  the whole hours around them from ``rollup_hour``; when neither user nor key
  is grouped or filtered, from the much smaller ``*_model`` tables instead.

A query that groups or filters by ``session`` or a tag cannot use rollups
(they do not keep those dimensions) and reads raw rows only; over ranges
older than the retention cutoff it therefore sees only the rows still kept,
and says so in `Summary.notes`. Likewise a partial hour whose raw rows were
deleted is answered from its whole hour, with a note.

Calendar buckets (``hour, day, week, month``) are computed in Python from UTC
hour prefixes, in the query's time zone (weeks start on Monday). A zone whose
offset is not a whole number of hours (Asia/Kolkata) cuts UTC hours in two, so
such queries bucket raw rows by minute and do not use rollups (slower, exact;
over deleted raw data they see only what is kept, with a note).

Costs are summed as integer picodollars (``cost_pico``); nothing here is a float.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from meterproxy.store.db import Db, Params
from meterproxy.store.dialect import Dialect
from meterproxy.store.queries import RequestFilter, match_clause
from meterproxy.store.rollups import (
    COARSE_DIMENSIONS,
    DIMENSION_SQL,
    DIMENSIONS,
    MEASURES,
    RollupState,
)
from meterproxy.timestamps import format_ts, parse_ts

__all__ = [
    "GROUPABLE",
    "MEASURE_NAMES",
    "TIME_DIMENSIONS",
    "Summary",
    "SummaryQuery",
    "bucket_label",
    "bucket_start",
    "is_groupable",
    "summarize",
]

TIME_DIMENSIONS = ("hour", "day", "week", "month")
#: Dimensions ``group_by`` accepts (plus ``tag:<name>``).
GROUPABLE = (*DIMENSIONS, "session", *TIME_DIMENSIONS)
MEASURE_NAMES = list(MEASURES)
_RAW_ONLY_COLUMNS = {"session": "session"}


def is_groupable(name: str) -> bool:
    return name in GROUPABLE or (name.startswith("tag:") and len(name) > 4)


@dataclass(slots=True)
class SummaryQuery:
    filter: RequestFilter = field(default_factory=RequestFilter)
    group_by: list[str] = field(default_factory=list)
    tz: tzinfo = UTC


@dataclass(slots=True)
class Summary:
    #: Measure name -> integer sum (``cost_pico`` included).
    totals: dict[str, int]
    #: ``(key, measures)`` pairs; ``key`` maps each group_by dimension to its value.
    groups: list[tuple[dict[str, str | None], dict[str, int]]]
    notes: list[str] = field(default_factory=list)


# -- time helpers ------------------------------------------------------------


def _floor(ts: str | None, unit: str) -> str | None:
    if ts is None:
        return None
    dt = parse_ts(ts).replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        dt = dt.replace(hour=0)
    return format_ts(dt)


def _ceil(ts: str | None, unit: str) -> str | None:
    if ts is None:
        return None
    floor = _floor(ts, unit)
    assert floor is not None
    if floor == ts:
        return ts
    return format_ts(parse_ts(floor) + (timedelta(days=1) if unit == "day" else timedelta(hours=1)))


def _whole_hour_zone(tz: tzinfo, flt: RequestFilter) -> bool:
    moments = [datetime.now(UTC)] + [parse_ts(t) for t in (flt.since, flt.until) if t]
    return all(
        int((m.astimezone(tz).utcoffset() or timedelta()).total_seconds()) % 3600 == 0 for m in moments
    )


def _is_utc(tz: tzinfo) -> bool:
    return tz is UTC or str(tz) in ("UTC", "Etc/UTC", "Etc/GMT", "GMT", "Etc/Zulu", "Zulu", "UCT")


# -- plan ----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Raw:
    since: str | None
    until: str | None
    rowid_op: str | None  # ">" or "<=" against the watermark, None for all rows


@dataclass(slots=True, frozen=True)
class _Rollup:
    table: str
    since: str | None  # on the table's bucket boundary
    until: str | None


def _plan(q: SummaryQuery, state: RollupState, notes: list[str], minute: bool) -> list[_Raw | _Rollup]:
    flt = q.filter
    s, u = flt.since, flt.until
    horizon = state.compacted_before
    # Rollups keep neither sessions nor tags, and their hours straddle the calendar
    # buckets of zones offset by a fraction of an hour: those queries read raw rows.
    raw_only = (
        minute
        or bool(flt.session is not None or flt.tags)
        or any(g == "session" or g.startswith("tag:") for g in q.group_by)
    )
    if raw_only:
        if horizon is not None and (s is None or s < horizon):
            notes.append(
                f"raw rows before {horizon} were deleted by retention; figures grouped or filtered "
                "by session or tag, or bucketed in a zone with a fractional-hour offset, cover only "
                "the rows still kept"
            )
        return [_Raw(s, u, None)]
    time_dims = [g for g in q.group_by if g in TIME_DIMENSIONS]
    use_day = not time_dims or (time_dims[0] != "hour" and _is_utc(q.tz))
    segs: list[_Raw | _Rollup] = [_Raw(s, u, ">")]
    used = {g for g in q.group_by if g not in TIME_DIMENSIONS}
    used |= {d for d in DIMENSIONS if getattr(flt, d) is not None}
    suffix = "_model" if used <= set(COARSE_DIMENSIONS) else ""  # the tables without user and key

    def edge(a: str | None, b: str | None) -> None:
        if horizon is not None and (a is None or a < horizon):
            whole = (_floor(a, "hour"), _ceil(b, "hour"))
            notes.append(
                f"raw rows before {horizon} were deleted by retention; the partial hour "
                f"{a}..{b} is answered for the whole hour from rollups"
            )
            segs.append(_Rollup(f"rollup_hour{suffix}", *whole))
        else:
            segs.append(_Raw(a, b, "<="))

    sh, uh = _ceil(s, "hour"), _floor(u, "hour")
    if sh is not None and uh is not None and sh >= uh:
        edge(s, u)
        return segs
    if s != sh:
        edge(s, sh)
    if u != uh:
        edge(uh, u)
    if use_day:
        sd, ud = _ceil(sh, "day"), _floor(uh, "day")
        if sd is None or ud is None or sd < ud:
            if sh != sd:
                segs.append(_Rollup(f"rollup_hour{suffix}", sh, sd))
            segs.append(_Rollup(f"rollup_day{suffix}", sd, ud))
            if ud != uh:
                segs.append(_Rollup(f"rollup_hour{suffix}", ud, uh))
            return segs
    segs.append(_Rollup(f"rollup_hour{suffix}", sh, uh))
    return segs


# -- SQL -------------------------------------------------------------------------


def _dim_filters(flt: RequestFilter, raw: bool, p: Params, dialect: Dialect) -> list[str]:
    clauses = []
    for dim, column in DIMENSION_SQL.items():
        value = getattr(flt, dim)
        if value is not None:
            clauses.append(match_clause(column if raw else _quoted(dim), value, p))
    if raw:
        if flt.session is not None:
            clauses.append(f"session = {p(flt.session)}")
        for tag, value in flt.tags.items():
            clauses.append(f"{dialect.json_text('tags', p, tag)} = {p(value)}")
    return clauses


def _quoted(dim: str) -> str:
    return '"user"' if dim == "user" else dim


def _raw_sql(
    q: SummaryQuery, seg: _Raw, rowids: tuple[str, str], minute: bool, p: Params, dialect: Dialect
) -> str:
    select: list[str] = []
    for g in q.group_by:
        if g in TIME_DIMENSIONS:
            select.append(f"substr(ts, 1, {16 if minute else 13})")
        elif g.startswith("tag:"):
            select.append(f"COALESCE({dialect.json_text('tags', p, g[4:])}, '')")
        else:
            select.append(f"COALESCE({_RAW_ONLY_COLUMNS.get(g) or DIMENSION_SQL[g]}, '')")
    clauses = _dim_filters(q.filter, True, p, dialect)
    # Above the watermark the rowid range is the small, selective one: an expression over ts
    # keeps SQLite's planner off the ts index there.
    ts = "(ts || '')" if seg.rowid_op == ">" else "ts"
    if seg.since is not None:
        clauses.append(f"{ts} >= {p(seg.since)}")
    if seg.until is not None:
        clauses.append(f"{ts} < {p(seg.until)}")
    if seg.rowid_op is not None:
        # Bound parameters, not subqueries, and a closed range above the watermark: the planner
        # sees how few rows lie there even before the table has statistics (PostgreSQL).
        watermark, top = rowids
        clauses.append(f"rowid {seg.rowid_op} {watermark}")
        if seg.rowid_op == ">":
            clauses.append(f"rowid <= {top}")
    where = " AND ".join(clauses) or "1 = 1"
    sql = f"SELECT 0, {', '.join([*select, *MEASURES.values()])} FROM requests WHERE {where}"
    if select:
        sql += " GROUP BY " + ", ".join(str(i + 2) for i in range(len(select)))
    return sql


def _rollup_sql(q: SummaryQuery, seg: _Rollup, p: Params, dialect: Dialect) -> str:
    width = 13 if seg.table.startswith("rollup_hour") else 10
    select = ["bucket" if g in TIME_DIMENSIONS else _quoted(g) for g in q.group_by]
    clauses = _dim_filters(q.filter, False, p, dialect)
    if seg.since is not None:
        clauses.append(f"bucket >= {p(seg.since[:width])}")
    if seg.until is not None:
        clauses.append(f"bucket < {p(seg.until[:width])}")
    sums = [f"sum({m})" for m in MEASURES]
    where = " AND ".join(clauses) or "1 = 1"
    sql = f"SELECT 0, {', '.join([*select, *sums])} FROM {seg.table} WHERE {where}"
    if select:
        sql += " GROUP BY " + ", ".join(str(i + 2) for i in range(len(select)))
    return sql


def _moved_sql(q: SummaryQuery, state: RollupState, watermark: str, p: Params) -> str:
    """A row marked 1 if a roll-up or retention ran since `state` was read (the plan is stale)."""
    blanks = ["NULL"] * len(q.group_by) + ["0"] * len(MEASURES)
    return (
        f"SELECT 1, {', '.join(blanks)} FROM rollup_state WHERE id = 1 AND "
        f"(watermark <> {watermark} OR COALESCE(compacted_before, '') <> {p(state.compacted_before or '')})"
    )


# -- buckets -----------------------------------------------------------------------


def bucket_label(prefix: str, kind: str, tz: tzinfo) -> str:
    """A UTC ts prefix (day, hour or minute) -> the calendar bucket it falls in, in ``tz``."""
    if len(prefix) == 10:
        start = datetime.fromisoformat(prefix).replace(tzinfo=UTC)
    elif len(prefix) == 13:
        start = datetime.fromisoformat(prefix + ":00").replace(tzinfo=UTC)
    else:
        start = datetime.fromisoformat(prefix).replace(tzinfo=UTC)
    local = start.astimezone(tz)
    if kind == "hour":
        return local.replace(minute=0, second=0, microsecond=0).isoformat()
    if kind == "day":
        return local.date().isoformat()
    if kind == "week":
        return (local.date() - timedelta(days=local.weekday())).isoformat()
    return local.strftime("%Y-%m")


def bucket_start(label: str, kind: str, tz: tzinfo) -> datetime:
    """The instant a bucket label (as `summarize` returns it) starts."""
    if kind == "hour":
        return datetime.fromisoformat(label)
    if kind == "month":
        label += "-01"
    return datetime.fromisoformat(label).replace(tzinfo=tz)


# -- run ---------------------------------------------------------------------------


def _accumulate(
    acc: dict[tuple[Any, ...], list[int]],
    rows: Iterable[Sequence[Any]],
    q: SummaryQuery,
    labels: dict[str, str],
) -> None:
    """Fold rows ``(marker, *group, *measures)`` into ``acc`` (the marker is already checked)."""
    n = len(q.group_by) + 1
    for row in rows:
        measures = row[n:]
        if not measures[0]:
            continue
        key_parts: list[Any] = []
        for g, value in zip(q.group_by, row[1:n], strict=True):
            if g in TIME_DIMENSIONS:
                label = labels.get(value)
                if label is None:
                    label = labels[value] = bucket_label(value, g, q.tz)
                key_parts.append(label)
            else:
                key_parts.append(value if value != "" else None)
        key = tuple(key_parts)
        current = acc.get(key)
        if current is None:
            acc[key] = [int(v or 0) for v in measures]
        else:
            for i, v in enumerate(measures):
                current[i] += int(v or 0)


def _sort_key(q: SummaryQuery) -> Any:
    cost = MEASURE_NAMES.index("cost_pico")
    time_index = next((i for i, g in enumerate(q.group_by) if g in TIME_DIMENSIONS), None)

    def key(item: tuple[tuple[Any, ...], list[int]]) -> Any:
        k, m = item
        first = k[time_index] if time_index is not None else ""
        return (first, -m[cost], -m[0], [("" if v is None else v) for v in k])

    return key


def _state_and_top(conn: Db) -> tuple[RollupState, int]:
    """The rollup state and the newest rowid: rows committed after this read are left out."""
    row = conn.execute(
        "SELECT watermark, compacted_before, (SELECT max(rowid) FROM requests) FROM rollup_state WHERE id = 1"
    ).fetchone()
    watermark = int(row[0])
    return RollupState(watermark, row[1]), max(watermark, int(row[2] or 0))


def summarize(conn: Db, q: SummaryQuery) -> Summary:
    """Totals and groups for ``q`` (see module docstring). ``conn`` is a read connection.

    One statement (a ``UNION ALL`` of the plan's pieces) reads the rows, so it
    is one snapshot on either engine and one round trip on PostgreSQL. The plan
    depends on the rollup state read just before (the watermark splits raw rows
    from rolled-up ones, the retention horizon decides the edges); the statement
    also returns a marked row if either moved meanwhile, and is then re-planned.
    The newest rowid read with the state closes the raw range: the summary is as
    of that read (rowids follow commit order on both engines).
    """
    minute = any(g in TIME_DIMENSIONS for g in q.group_by) and not _whole_hour_zone(q.tz, q.filter)
    while True:
        notes: list[str] = []
        state, top = _state_and_top(conn)
        p = Params()
        watermark = p(state.watermark)
        rowids = (watermark, p(top))
        parts = [
            _raw_sql(q, seg, rowids, minute, p, conn.dialect)
            if isinstance(seg, _Raw)
            else _rollup_sql(q, seg, p, conn.dialect)
            for seg in _plan(q, state, notes, minute)
        ]
        parts.append(_moved_sql(q, state, watermark, p))
        rows = conn.execute(" UNION ALL ".join(parts), p.values).fetchall()
        if not any(row[0] for row in rows):
            break
    acc: dict[tuple[Any, ...], list[int]] = {}
    labels: dict[str, str] = {}
    _accumulate(acc, rows, q, labels)
    totals = [0] * len(MEASURE_NAMES)
    for measures in acc.values():
        for i, v in enumerate(measures):
            totals[i] += v
    groups = (
        [
            (dict(zip(q.group_by, k, strict=True)), dict(zip(MEASURE_NAMES, m, strict=True)))
            for k, m in sorted(acc.items(), key=_sort_key(q))
        ]
        if q.group_by
        else []
    )
    return Summary(dict(zip(MEASURE_NAMES, totals, strict=True)), groups, notes)

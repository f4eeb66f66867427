"""Terminal reports: the numbers of ``/api/summary``, laid out for a person (or a script).

A report is one or two summaries (`SummaryReader.summary`, from the database
through `meterproxy.store.summary.summarize`, or from a running proxy's
``/api/summary``), then pure formatting:

- `build_report` turns the summaries into a `Report`: rows (period or session
  or model, optionally split by a second dimension), totals, and the cache
  savings;
- `render_table`, `render_csv` and `render_json` print it. JSON and CSV carry
  exact figures (costs as decimal text, tokens as integers) and fixed field
  names, so scripts can rely on them; the table uses compact units
  (``1.2K``, ``3.4M``), thousands separators and ``$0.0123`` for small costs.

Cache savings are `meterproxy.savings.cache_savings` over the summary by model
and UTC day: the same definition ``/api/summary``, ``/api/whatif`` and the page
use (net of cache-write premiums; see that module).
"""

from __future__ import annotations

import csv
import io
import json
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from meterproxy.csv_cells import safe_cell
from meterproxy.money import from_pico, usd_text
from meterproxy.pricing import PriceBook
from meterproxy.savings import cache_savings
from meterproxy.store.backend import apply_migrations, connect, parse_db, read_connection
from meterproxy.store.migrations import pending_migrations
from meterproxy.store.queries import RequestFilter
from meterproxy.store.sessions import session_facts
from meterproxy.timestamps import format_ts, parse_ts

__all__ = [
    "KINDS",
    "TOKEN_FIELDS",
    "ApiReader",
    "DbReader",
    "Report",
    "SummaryReader",
    "build_report",
    "compact",
    "money",
    "parse_bound",
    "render_csv",
    "render_json",
    "render_table",
]

#: Report kind -> the summary dimension its rows are keyed by.
KINDS = {"daily": "day", "weekly": "week", "monthly": "month", "session": "session", "model": "model"}
TOKEN_FIELDS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
_COUNTS = ("requests", *TOKEN_FIELDS, "unpriced_requests")
_ESTIMATES = ("estimated_requests", "estimated_cost_usd")
#: How many of a row's priced requests are priced from something else than reported usage x the
#: tables: a stream cut before its final usage (a lower bound), the provider's own figure.
_KINDS = ("partial_requests", "provider_cost_requests")

Summary = dict[str, Any]  # the /api/summary shape: {"totals": {...}, "groups": [{"key": {...}, ...}]}


class SummaryReader(Protocol):
    def summary(self, group_by: Sequence[str]) -> Summary: ...

    def sessions(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{session: {"first_ts", "last_ts", "users", "models"}}`` for the named sessions."""
        ...


@dataclass(slots=True)
class Query:
    since: str | None = None  # stored ts form (UTC) or None
    until: str | None = None
    tz: tzinfo = UTC
    source: str | None = None
    session: str | None = None


def parse_bound(value: str | None, tz: tzinfo, *, end: bool) -> str | None:
    """``2026-11-01`` (a day in `tz`; an end date is inclusive) or an ISO datetime -> stored ts text."""
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value) + timedelta(days=1 if end else 0)
            moment = datetime.combine(day, time(), tz)
        else:
            moment = parse_ts(value, naive=tz)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime") from exc
    return format_ts(moment)


def _exact(measures: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: int(measures.get(name) or 0) for name in _COUNTS}
    out["cost_usd"] = Decimal(str(measures.get("cost_usd") or 0))
    # Estimates of answers without usage (estimate_usage): carried apart, never added to cost_usd.
    out["estimated_requests"] = int(measures.get("estimated_requests") or 0)
    out["estimated_cost_usd"] = Decimal(str(measures.get("estimated_cost_usd") or 0))
    for name in _KINDS:
        out[name] = int(measures.get(name) or 0)
    return out


def ensure_schema(db: str) -> None:
    """Apply pending migrations first (the summary engine reads the rollup tables).

    A database only the importer has written, or one last opened by an older
    version, may lack some; they are created here, as the proxy would. PostgreSQL
    schemas are left to ``meterproxy migrate`` and the proxy.
    """
    if parse_db(db).is_postgres:
        return
    conn = read_connection(db)
    try:
        pending = bool(pending_migrations(conn))
    finally:
        conn.close()
    if pending:
        conn = connect(db)
        try:
            apply_migrations(conn)
        finally:
            conn.close()


class DbReader:
    """Summaries straight from the SQLite file (read-only; the proxy may be running)."""

    def __init__(self, db: str | Path, query: Query) -> None:
        self.db = str(db)
        self.query = query

    def summary(self, group_by: Sequence[str]) -> Summary:
        from meterproxy.store.summary import SummaryQuery, summarize

        q = self.query
        flt = RequestFilter(since=q.since, until=q.until, source=q.source, session=q.session)
        ensure_schema(self.db)
        conn = read_connection(self.db)
        try:
            result = summarize(conn, SummaryQuery(flt, list(group_by), q.tz))
        finally:
            conn.close()

        def api(measures: Mapping[str, int]) -> dict[str, Any]:
            out: dict[str, Any] = {k: v for k, v in measures.items() if not k.endswith("cost_pico")}
            out["cost_usd"] = from_pico(measures["cost_pico"])
            out["estimated_cost_usd"] = from_pico(measures.get("estimated_cost_pico", 0))
            return out

        return {
            "totals": api(result.totals),
            "groups": [{"key": key, **api(m)} for key, m in result.groups],
        }

    def sessions(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        q = self.query
        flt = RequestFilter(since=q.since, until=q.until, source=q.source)
        conn = read_connection(self.db)
        try:
            facts = session_facts(conn, flt, list(names))
        finally:
            conn.close()
        return {
            name: {
                "first_ts": f.first_ts,
                "last_ts": f.last_ts,
                "users": sorted(f.users),
                "models": sorted(f.models),
            }
            for name, f in facts.items()
        }


class ApiReader:
    """Summaries from a running proxy's ``/api/summary`` (``--url``)."""

    def __init__(self, url: str, query: Query, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.query = query
        self.token = token
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        qs = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None and v != ""})
        request = urllib.request.Request(f"{self.url}{path}?{qs}")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read(), parse_float=Decimal)

    def summary(self, group_by: Sequence[str]) -> Summary:
        q = self.query
        params = {"since": q.since, "until": q.until, "source": q.source, "session": q.session}
        params["tz"] = str(q.tz)
        if group_by:
            params["group_by"] = ",".join(group_by)
        body: Summary = self._get("/api/summary", params)
        return body

    def sessions(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """From ``/api/sessions`` pages (most expensive first) until every named session is seen."""
        q = self.query
        wanted, found = set(names), dict[str, dict[str, Any]]()
        offset: int | None = 0
        while wanted - found.keys() and offset is not None:
            params = {"since": q.since, "until": q.until, "source": q.source, "sort": "cost"}
            page = self._get("/api/sessions", {**params, "limit": 1000, "offset": offset})
            for s in page["sessions"]:
                if s["session"] in wanted:
                    found[s["session"]] = {k: s[k] for k in ("first_ts", "last_ts", "users", "models")}
            offset = page["next_offset"]
        return found


@dataclass(slots=True)
class Report:
    kind: str
    group_by: list[str]
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    cache_savings_usd: Decimal
    since: str | None
    until: str | None
    tz: str
    #: Models the price tables do not know, with their requests and tokens (their cost is unknown).
    unpriced_models: list[dict[str, Any]] = field(default_factory=list)
    #: Rows before ``--limit``.
    total_rows: int = 0


def _merge_models(rows: list[dict[str, Any]], book: PriceBook) -> list[dict[str, Any]]:
    """Rows keyed by model -> rows keyed by the price-table id each name prices as, raw names kept.

    One model reaches the store under several names (``claude-haiku-4-5`` and its
    dated snapshot, ``anthropic/claude-sonnet-4`` through a router); a report by
    model counts it once. A name the tables do not know stays its own row.
    """
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        raw = row["key"].get("model")
        priced = book.resolve(raw) if raw else None
        key = {**row["key"], "model": priced or raw}
        ident = tuple(sorted((k, str(v)) for k, v in key.items()))
        into = merged.get(ident)
        if into is None:
            merged[ident] = {**row, "key": key, "names": [raw] if raw else []}
            continue
        for name in _COUNTS:
            into[name] += row[name]
        into["cost_usd"] += row["cost_usd"]
        into["estimated_requests"] += row["estimated_requests"]
        into["estimated_cost_usd"] += row["estimated_cost_usd"]
        for name in _KINDS:
            into[name] += row[name]
        if raw and raw not in into["names"]:
            into["names"].append(raw)
    return list(merged.values())


def _unpriced_models(by_model: Summary) -> list[dict[str, Any]]:
    return [
        {
            "model": g["key"].get("model"),
            "unpriced_requests": int(g.get("unpriced_requests") or 0),
            "input_tokens": int(g.get("input_tokens") or 0),
            "output_tokens": int(g.get("output_tokens") or 0),
        }
        for g in sorted(by_model["groups"], key=lambda g: -int(g.get("unpriced_requests") or 0))
        if g.get("unpriced_requests")
    ]


def build_report(
    reader: SummaryReader,
    kind: str,
    book: PriceBook,
    second: str | None = None,
    *,
    limit: int | None = None,
    raw_models: bool = False,
) -> Report:
    """The rows of one report; ``limit`` keeps the most expensive rows of a session or model report."""
    dim = KINDS[kind]
    group_by = [dim] + ([second] if second and second != dim else [])
    main = reader.summary(group_by)
    rows = [{"key": group["key"], **_exact(group)} for group in main["groups"]]
    if "model" in group_by and not raw_models:
        rows = _merge_models(rows, book)
    if dim in ("session", "model"):
        rows.sort(key=lambda r: (-r["cost_usd"], -r["requests"]))
    shown = len(rows)
    if limit is not None and dim in ("session", "model"):
        rows = rows[:limit]
    if dim == "session":
        facts = reader.sessions([r["key"]["session"] for r in rows if r["key"].get("session")])
        for r in rows:
            r["session"] = facts.get(r["key"].get("session") or "", {})
    by_model_day = reader.summary(["model", "day"])
    query = getattr(reader, "query", None)
    return Report(
        kind=kind,
        group_by=group_by,
        rows=rows,
        totals=_exact(main["totals"]),
        cache_savings_usd=cache_savings(book, ((g["key"], g) for g in by_model_day["groups"])).saved_usd,
        since=getattr(query, "since", None),
        until=getattr(query, "until", None),
        tz=str(getattr(query, "tz", UTC)),
        unpriced_models=_unpriced_models(reader.summary(["model"])),
        total_rows=shown,
    )


# -- formatting -----------------------------------------------------------------------------


def compact(n: int) -> str:
    """Token counts for a table: ``987``, ``9,876``, ``12.3K``, ``3.4M``, ``1.2B``."""
    if n < 10_000:
        return f"{n:,}"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
    return f"{n:,}"  # pragma: no cover


def money(value: Decimal) -> str:
    """``$1,234.57`` from a dollar up; ``$0.0123`` below; two significant digits for crumbs.

    An embeddings call costs ``$0.0000026``: printed with six decimals it would
    read ``$0.000000``, an invented zero. ``$0`` only for nothing.
    """
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) >= Decimal("0.0001"):
        return f"${value:.4f}"
    digits = min(12, 1 - value.adjusted())
    return f"${value:.{digits}f}"


_LABELS = {
    "requests": "Requests",
    "input_tokens": "Input",
    "cache_read_tokens": "Cache read",
    "cache_write_tokens": "Cache write",
    "output_tokens": "Output",
    "reasoning_tokens": "Reasoning",
    "cost_usd": "Cost",
}
_KEY_LABELS = {"day": "Date", "week": "Week", "month": "Month", "session": "Session", "model": "Model"}


def _key_text(value: Any) -> str:
    return "(none)" if value in (None, "") else str(value)


PRICING_HINT = (
    "give them a price with `meterproxy serve --pricing FILE` (pricing/README.md), then `meterproxy reprice`"
)


def _unpriced_only(row: Mapping[str, Any]) -> bool:
    """Nothing priced, something unpriced: the cost is unknown, not zero."""
    return not row["cost_usd"] and bool(row["unpriced_requests"])


def _cost_text(row: Mapping[str, Any]) -> str:
    if _unpriced_only(row):
        return "unpriced"
    return money(row["cost_usd"]) + ("*" if row["unpriced_requests"] else "")


def _session_cells(row: Mapping[str, Any], tz: str) -> list[str]:
    facts = row.get("session") or {}
    first = facts.get("first_ts")
    day = parse_ts(first).astimezone(ZoneInfo(tz)).date().isoformat() if first else ""
    models = ", ".join(facts.get("models") or [])
    return [
        day,
        ", ".join(facts.get("users") or []) or "–",
        models if len(models) <= 48 else models[:47] + "…",
    ]


def render_table(report: Report) -> str:
    session = report.kind == "session"
    aliases = report.kind == "model" and any(len(r.get("names") or []) > 1 for r in report.rows)
    head = [_KEY_LABELS.get(d, d.replace("tag:", "#").title()) for d in report.group_by]
    extra = ["Date", "User", "Models"] if session else ["Also as"] if aliases else []
    head += extra + list(_LABELS.values())
    keys = len(report.group_by) + len(extra)
    body: list[list[str]] = []
    for row in report.rows:
        cells = [_key_text(row["key"].get(d)) for d in report.group_by]
        if session and row["key"].get("session") in (None, ""):
            cells[0] = "(no session)"
        if session:
            cells += _session_cells(row, report.tz)
        elif aliases:
            model = row["key"].get("model")
            cells.append(", ".join(n for n in row.get("names") or [] if n != model) or "")
        cells += [f"{row['requests']:,}", *(compact(row[f]) for f in TOKEN_FIELDS), _cost_text(row)]
        body.append(cells)
    t = report.totals
    total = ["Total", *([""] * (keys - 1))]
    total += [f"{t['requests']:,}", *(compact(t[f]) for f in TOKEN_FIELDS), money(t["cost_usd"])]
    widths = [max(len(r[i]) for r in (head, *body, total)) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < keys else c.rjust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("─" * w for w in widths)
    out = [line(head), rule, *(line(r) for r in body), rule, line(total)]
    if not body:
        out.insert(2, "(no requests in this range)")
    if report.total_rows > len(report.rows):
        noun = "sessions" if session else "rows"
        out.append(
            f"(the {len(report.rows):,} most expensive of {report.total_rows:,} {noun}; the total covers all)"
        )
    inp = t["input_tokens"]
    hit = f" ({t['cache_read_tokens'] / inp:.0%} of input tokens read from cache)" if inp else ""
    out.append("")
    out.append(f"Cache savings: {money(report.cache_savings_usd)}{hit}")
    if t["unpriced_requests"]:
        out.append(
            f"Unpriced: {t['unpriced_requests']:,} requests whose model is not in the price tables "
            "are not in the costs above (* marks a row that has some):"
        )
        for m in report.unpriced_models:
            out.append(
                f"  {_key_text(m['model'])}: {m['unpriced_requests']:,} requests, "
                f"{compact(m['input_tokens'])} input / {compact(m['output_tokens'])} output tokens"
            )
        out.append(f"  To count them, {PRICING_HINT}.")
    kinds = []
    if t["partial_requests"]:
        kinds.append(f"{t['partial_requests']:,} from streams cut before their final usage (lower bounds)")
    if t["provider_cost_requests"]:
        kinds.append(
            f"{t['provider_cost_requests']:,} at the provider's own figure (the tables had no price)"
        )
    if kinds:
        out.append("Of the priced requests: " + "; ".join(kinds) + ".")
    if t["estimated_requests"]:
        n = t["estimated_requests"]
        out.append(
            f"Estimated (no usage reported, not in the totals): {n:,} request{'s' if n > 1 else ''}, "
            f"{money(t['estimated_cost_usd'])} by meterproxy's own token count (estimate_usage)."
        )
    return "\n".join(out)


def _flat(row: Mapping[str, Any], group_by: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {d: row["key"].get(d) for d in group_by}
    out.update({name: row[name] for name in _COUNTS})
    out["cost_usd"] = None if _unpriced_only(row) else usd_text(row["cost_usd"])
    # Estimates (estimate_usage) in columns of their own, never in cost_usd: the table's
    # "Estimated" line and the JSON totals, per row.
    out["estimated_requests"] = row["estimated_requests"]
    out["estimated_cost_usd"] = usd_text(row["estimated_cost_usd"])
    out.update({name: row[name] for name in _KINDS})
    return out


def _json_row(row: Mapping[str, Any], report: Report) -> dict[str, Any]:
    out = _flat(row, report.group_by)
    if "names" in row:
        out["names"] = row["names"]
    if report.kind == "session":
        out.update(row.get("session") or {})
    return out


def render_json(report: Report) -> str:
    totals = dict(report.totals)
    totals["cost_usd"] = usd_text(totals["cost_usd"])
    totals["estimated_cost_usd"] = usd_text(totals["estimated_cost_usd"])
    doc = {
        "report": report.kind,
        "since": report.since,
        "until": report.until,
        "tz": report.tz,
        "group_by": report.group_by,
        "rows": [_json_row(r, report) for r in report.rows],
        "rows_total": report.total_rows,
        "totals": totals,
        "cache_savings_usd": usd_text(report.cache_savings_usd),
        "unpriced_models": report.unpriced_models,
    }
    if report.unpriced_models:
        doc["unpriced_note"] = f"not in cost_usd (null when a row has no priced request); {PRICING_HINT}"
    return json.dumps(doc, indent=2)


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    # CRLF (RFC 4180): csv quotes a field holding a line terminator's character, so a CR
    # in a name cannot start a new row with a formula in its first cell.
    fields = [*report.group_by, *_COUNTS, "cost_usd", *_KINDS, *_ESTIMATES]
    writer = csv.DictWriter(buffer, fields, lineterminator="\r\n")
    writer.writeheader()
    for row in report.rows:
        flat = _flat(row, report.group_by)
        for d in report.group_by:  # model names, users, sessions, tags: client or upstream text
            if isinstance(flat[d], str):
                flat[d] = safe_cell(flat[d])
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    return buffer.getvalue()

"""Reconcile: compare what meterproxy recorded with the provider's own usage and cost reports.

The provider's organisation APIs say what it will bill, per UTC day and model:

- OpenAI: ``GET /v1/organization/usage/completions`` (and ``/usage/embeddings``)
  grouped by ``model`` for tokens and requests, ``GET /v1/organization/costs``
  grouped by ``line_item`` for dollars (a line item reads ``"<model>, input"``,
  ``"<model>, output"``, ...). Key: ``OPENAI_ADMIN_KEY``.
- Anthropic: ``GET /v1/organizations/usage_report/messages`` grouped by
  ``model`` for tokens, ``GET /v1/organizations/cost_report`` grouped by
  ``description`` for dollars (``amount`` is a decimal string in cents). Key:
  ``ANTHROPIC_ADMIN_API_KEY`` (an Admin key, ``sk-ant-admin...``).

Our side is the same day x model grouping of the rows proxied to that
upstream (`meterproxy.store.summary.summarize`, UTC days). Each (day, model)
pair gets one verdict, worst first:

- ``missing_here``: the provider billed usage meterproxy never saw (traffic
  that bypassed the proxy, or another key in the organisation);
- ``missing_there``: meterproxy recorded usage the provider does not report
  (another organisation's key through the proxy, or a report not final yet:
  providers finish a day's figures hours later);
- ``token_mismatch``: both saw the pair, with token counts that differ by more
  than the tolerance (part of the traffic bypassed the proxy);
- ``price_mismatch``: tokens agree but the dollars differ by more than the
  tolerance (a price table that is wrong or out of date, a discount, a tier);
- ``matched``.

Input tokens are compared as meterproxy counts them: every prompt token,
cached ones included (OpenAI's ``input_tokens``; Anthropic's uncached + cache
reads + cache writes). Models are matched by name after the price book's
alias resolution, so ``claude-sonnet-4-5`` and ``claude-sonnet-4-5-20250929``
meet. Both sides are paginated to the end (``has_more``/``next_page``).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from meterproxy.money import from_pico, usd_text
from meterproxy.pricing import PriceBook
from meterproxy.reports import money
from meterproxy.store.queries import RequestFilter, read_connection
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.timestamps import format_ts, parse_ts

__all__ = ["PROVIDERS", "DayModel", "ProviderAnswerError", "Reconciliation", "fetch_provider", "reconcile"]

Verdict = Literal["matched", "missing_here", "missing_there", "token_mismatch", "price_mismatch"]
ORDER: tuple[Verdict, ...] = ("missing_here", "missing_there", "token_mismatch", "price_mismatch", "matched")


@dataclass(slots=True)
class Side:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal | None = None

    def add_cost(self, value: Decimal) -> None:
        self.cost_usd = value if self.cost_usd is None else self.cost_usd + value

    @property
    def has_usage(self) -> bool:
        return bool(self.requests or self.input_tokens or self.output_tokens or self.cost_usd)


@dataclass(slots=True)
class DayModel:
    day: str
    model: str
    ours: Side = field(default_factory=Side)
    theirs: Side = field(default_factory=Side)
    verdict: Verdict = "matched"

    def as_dict(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {
                "requests": s.requests,
                "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens,
                "cost_usd": None if s.cost_usd is None else usd_text(s.cost_usd),
            }

        return {
            "day": self.day,
            "model": self.model,
            "verdict": self.verdict,
            "meterproxy": side(self.ours),
            "provider": side(self.theirs),
        }


@dataclass(slots=True)
class Reconciliation:
    provider: str
    since: str
    until: str
    rows: list[DayModel]
    tolerance: Decimal

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(ORDER, 0)
        for r in self.rows:
            out[r.verdict] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        ours = sum((r.ours.cost_usd or Decimal(0) for r in self.rows), Decimal(0))
        theirs = sum((r.theirs.cost_usd or Decimal(0) for r in self.rows), Decimal(0))
        return {
            "provider": self.provider,
            "since": self.since,
            "until": self.until,
            "tolerance": str(self.tolerance),
            "verdicts": self.counts(),
            "totals": {"meterproxy_cost_usd": usd_text(ours), "provider_cost_usd": usd_text(theirs)},
            "rows": [r.as_dict() for r in self.rows],
        }


# -- the provider's side --------------------------------------------------------------------

Fetch = Callable[[str, dict[str, str]], dict[str, Any]]


class ProviderAnswerError(Exception):
    """The provider's report could not be read: not JSON, not its documented shape, or paging
    that never ends. Worded for the operator (no key in it)."""


def http_fetch(url: str, headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"accept": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=60) as answer:
        raw = answer.read()
    try:
        data = json.loads(raw)
    except ValueError:
        text = raw[:120].decode("utf-8", "replace")
        raise ProviderAnswerError(f"{url.partition('?')[0]} did not answer JSON: {text!r}") from None
    if not isinstance(data, dict):
        raise ProviderAnswerError(f"{url.partition('?')[0]} answered {type(data).__name__}, not an object")
    return data


def _pages(
    fetch: Fetch, base: str, path: str, params: list[tuple[str, str]], headers: dict[str, str]
) -> Iterator[Any]:
    page: str | None = None
    seen: set[str] = set()
    while True:
        query = params + ([("page", page)] if page else [])
        doc = fetch(f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(query)}", headers)
        yield from doc.get("data") or []
        page = doc.get("next_page")
        if not doc.get("has_more") or not page:
            return
        if page in seen:  # a cursor that comes back would page forever
            raise ProviderAnswerError(f"{path}: next_page {page!r} came back; paging stopped")
        seen.add(page)


def _day_of_unix(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _day_of_rfc3339(text: str) -> str:
    return parse_ts(text).strftime("%Y-%m-%d")


Table = dict[tuple[str, str], Side]


def _openai(fetch: Fetch, base: str, key: str, since: datetime, until: datetime) -> Table:
    headers = {"authorization": f"Bearer {key}"}
    window = [("start_time", str(int(since.timestamp()))), ("end_time", str(int(until.timestamp())))]
    table: Table = {}
    for path in ("/v1/organization/usage/completions", "/v1/organization/usage/embeddings"):
        params = [*window, ("bucket_width", "1d"), ("group_by", "model"), ("limit", "31")]
        for bucket in _pages(fetch, base, path, params, headers):
            day = _day_of_unix(int(bucket["start_time"]))
            for r in bucket.get("results") or []:
                side = table.setdefault((day, r.get("model") or "(unknown)"), Side())
                side.requests += int(r.get("num_model_requests") or 0)
                side.input_tokens += int(r.get("input_tokens") or 0)
                side.output_tokens += int(r.get("output_tokens") or 0)
    params = [*window, ("bucket_width", "1d"), ("group_by", "line_item"), ("limit", "180")]
    for bucket in _pages(fetch, base, "/v1/organization/costs", params, headers):
        day = _day_of_unix(int(bucket["start_time"]))
        for r in bucket.get("results") or []:
            amount = r.get("amount") or {}
            if str(amount.get("currency", "usd")).lower() != "usd":
                continue
            model = (r.get("line_item") or "(unattributed)").split(",")[0].strip()
            table.setdefault((day, model), Side()).add_cost(Decimal(str(amount.get("value", 0))))
    return table


def _anthropic(fetch: Fetch, base: str, key: str, since: datetime, until: datetime) -> Table:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    window = [
        ("starting_at", since.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("ending_at", until.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]
    table: Table = {}
    params = [*window, ("bucket_width", "1d"), ("group_by[]", "model"), ("limit", "31")]
    for bucket in _pages(fetch, base, "/v1/organizations/usage_report/messages", params, headers):
        day = _day_of_rfc3339(bucket["starting_at"])
        for r in bucket.get("results") or []:
            side = table.setdefault((day, r.get("model") or "(unknown)"), Side())
            creation = r.get("cache_creation") or {}
            side.input_tokens += (
                int(r.get("uncached_input_tokens") or 0)
                + int(r.get("cache_read_input_tokens") or 0)
                + int(creation.get("ephemeral_5m_input_tokens") or 0)
                + int(creation.get("ephemeral_1h_input_tokens") or 0)
            )
            side.output_tokens += int(r.get("output_tokens") or 0)
    params = [*window, ("bucket_width", "1d"), ("group_by[]", "description"), ("limit", "31")]
    for bucket in _pages(fetch, base, "/v1/organizations/cost_report", params, headers):
        day = _day_of_rfc3339(bucket["starting_at"])
        for r in bucket.get("results") or []:
            if str(r.get("currency", "USD")).upper() != "USD":
                continue
            model = r.get("model") or "(unattributed)"
            # "Cost amount in lowest currency units (e.g. cents) as a decimal string".
            table.setdefault((day, model), Side()).add_cost(Decimal(str(r.get("amount", "0"))) / 100)
    return table


@dataclass(frozen=True, slots=True)
class ProviderApi:
    base_url: str
    key_env: str
    read: Callable[[Fetch, str, str, datetime, datetime], Table]


PROVIDERS: dict[str, ProviderApi] = {
    "openai": ProviderApi("https://api.openai.com", "OPENAI_ADMIN_KEY", _openai),
    "anthropic": ProviderApi("https://api.anthropic.com", "ANTHROPIC_ADMIN_API_KEY", _anthropic),
}


def fetch_provider(
    provider: str,
    key: str,
    since: datetime,
    until: datetime,
    *,
    base_url: str | None = None,
    fetch: Fetch = http_fetch,
) -> Table:
    api = PROVIDERS[provider]
    try:
        return api.read(fetch, base_url or api.base_url, key, since, until)
    except (KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        # A bucket or result without a documented field, or a figure that is not a number.
        raise ProviderAnswerError(f"{provider}'s report is not in its documented shape ({exc!r})") from exc


# -- our side and the comparison ------------------------------------------------------------


def _ours(db: str, upstream: str, since: datetime, until: datetime) -> Table:
    flt = RequestFilter(since=_ts(since), until=_ts(until), upstream=upstream)
    conn = read_connection(db)
    try:
        summary = summarize(conn, SummaryQuery(flt, ["day", "model"]))
    finally:
        conn.close()
    table: Table = {}
    for key, m in summary.groups:
        side = Side(
            requests=int(m["requests"]) - int(m.get("unmetered_requests", 0)),
            input_tokens=int(m["input_tokens"]),
            output_tokens=int(m["output_tokens"]),
        )
        if m["cost_pico"] or not m.get("unpriced_requests"):
            side.cost_usd = from_pico(int(m["cost_pico"]))
        if side.has_usage:
            table[(str(key["day"])[:10], key["model"] or "(unknown)")] = side
    return table


def _ts(dt: datetime) -> str:
    return format_ts(dt)


def _differ(a: Decimal, b: Decimal, tolerance: Decimal, floor: Decimal) -> bool:
    gap = abs(a - b)
    return gap > floor and gap > tolerance * max(abs(a), abs(b))


def compare(ours: Table, theirs: Table, book: PriceBook, tolerance: Decimal) -> list[DayModel]:
    def canonical(model: str) -> str:
        return book.resolve(model) or model

    merged: dict[tuple[str, str], DayModel] = {}
    for (day, model), side in ours.items():
        _merge(merged.setdefault((day, canonical(model)), DayModel(day, model)).ours, side)
    for (day, model), side in theirs.items():
        _merge(merged.setdefault((day, canonical(model)), DayModel(day, model)).theirs, side)
    for row in merged.values():
        row.verdict = _verdict(row, tolerance)
    return sorted(merged.values(), key=lambda r: (r.day, ORDER.index(r.verdict), r.model))


def _merge(into: Side, more: Side) -> None:
    into.requests += more.requests
    into.input_tokens += more.input_tokens
    into.output_tokens += more.output_tokens
    if more.cost_usd is not None:
        into.add_cost(more.cost_usd)


def _verdict(row: DayModel, tolerance: Decimal) -> Verdict:
    ours, theirs = row.ours, row.theirs
    if not ours.has_usage:
        return "missing_here"
    if not theirs.has_usage:
        return "missing_there"
    tokens_ours, tokens_theirs = (
        ours.input_tokens + ours.output_tokens,
        theirs.input_tokens + theirs.output_tokens,
    )
    if (tokens_ours or tokens_theirs) and _differ(
        Decimal(tokens_ours), Decimal(tokens_theirs), tolerance, Decimal(0)
    ):
        return "token_mismatch"
    if (
        ours.cost_usd is not None
        and theirs.cost_usd is not None
        and _differ(ours.cost_usd, theirs.cost_usd, tolerance, Decimal("0.000001"))
    ):
        return "price_mismatch"
    return "matched"


def reconcile(
    provider: str,
    db: str,
    key: str,
    since: datetime,
    until: datetime,
    *,
    upstream: str | None = None,
    base_url: str | None = None,
    tolerance: Decimal = Decimal("0.01"),
    book: PriceBook | None = None,
    fetch: Fetch = http_fetch,
) -> Reconciliation:
    theirs = fetch_provider(provider, key, since, until, base_url=base_url, fetch=fetch)
    ours = _ours(db, upstream or provider, since, until)
    rows = compare(ours, theirs, book or PriceBook.default(), tolerance)
    return Reconciliation(provider, _ts(since), _ts(until), rows, tolerance)


def _utc_day(option: str, value: str) -> datetime:
    """A date (YYYY-MM-DD) or an ISO 8601 datetime (an offset is honoured; none means UTC) -> the
    UTC day it falls in, at midnight: the providers bucket by UTC day."""
    try:
        moment = parse_ts(value.strip())
    except ValueError:
        raise ValueError(f"{option} {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime") from None
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def day_range(since: str, until: str | None) -> tuple[datetime, datetime]:
    """``--since``/``--until`` as whole UTC days (until inclusive; default: today)."""
    start = _utc_day("--since", since)
    last = _utc_day("--until", until) if until else datetime.now(UTC)
    end = last.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    if end <= start:
        raise ValueError("--until must not be before --since")
    return start, end


# -- rendering ------------------------------------------------------------------------------

_EXPLAIN: dict[Verdict, str] = {
    "missing_here": "billed by the provider, never seen by meterproxy (traffic that bypassed the proxy?)",
    "missing_there": "recorded by meterproxy, not in the provider's report (another org's key, or not final)",
    "token_mismatch": "both saw it, token counts differ (part of the traffic bypassed the proxy?)",
    "price_mismatch": "tokens agree, dollars differ (a price table out of date, a discount or a tier)",
    "matched": "tokens and dollars agree",
}


def render_json(result: Reconciliation) -> str:
    return json.dumps(result.as_dict(), indent=2)


def render_table(result: Reconciliation) -> str:
    def cost(side: Side) -> str:
        if not side.has_usage:
            return "-"
        return "unpriced" if side.cost_usd is None else money(side.cost_usd)

    header = ["Day", "Model", "Verdict", "Requests", "Input tok", "Output tok", "Cost"]
    rows = [
        [
            r.day,
            r.model,
            r.verdict,
            f"{r.ours.requests:,} / {r.theirs.requests:,}",
            f"{r.ours.input_tokens:,} / {r.theirs.input_tokens:,}",
            f"{r.ours.output_tokens:,} / {r.theirs.output_tokens:,}",
            f"{cost(r.ours)} / {cost(r.theirs)}",
        ]
        for r in result.rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    out = [
        f"{result.provider}: {result.since[:10]} .. {result.until[:10]} (UTC days, until exclusive); "
        "each cell is meterproxy / provider",
        "",
        line(header),
        "  ".join("-" * w for w in widths),
        *(line(r) for r in rows),
        "",
    ]
    counts = result.counts()
    for verdict in ORDER:
        if counts[verdict]:
            out.append(f"{counts[verdict]:>4} {verdict}: {_EXPLAIN[verdict]}")
    if not result.rows:
        out.append("Neither side has usage in this range.")
    return "\n".join(out)

"""What-if: the selected traffic priced as if it had gone to another model, and what caching saved.

`what_if` reads the stored rows of a filter (raw rows, never rollups: a price
can depend on one request's size, long-context tiers, or on its time of day,
DeepSeek's windows, so sums of tokens cannot be repriced exactly) and prices
each row's token counts twice with the same `PriceBook.price` the meter uses:

- as stored (the row's ``cost_pico``, which is what the meter or the last
  ``reprice`` wrote), and
- as the target model, at the row's own time (``prices="dated"``, the default:
  what it would have cost then) or at one moment (``prices="today"``: what the
  same traffic would cost now). The row's service tier is kept.

So ``report --as-model M`` equals a ``reprice`` of the same rows, in a copy of
the database whose rows name ``M`` (and M's provider), to the picodollar.

Only rows with reported usage take part in the figures by model
(``usage_source = 'reported'``): a row without trusted tokens has nothing to
reprice. Rows the target cannot price (no price for it at that date) and rows
unpriced as stored are counted apart, never folded into the difference as
zeros: the difference is over rows priced both ways.

Estimated rows (``estimate_usage``: no usage reported, meterproxy counted the
tokens, `meterproxy.estimate`) are priced the same way from their counted
tokens, as stored (``estimated_cost_pico``) and as the target, into a separate
``estimated`` line that is never added to the totals: an estimate is not spend
anywhere. It equals a ``reprice`` of those rows renamed to the target, whose
estimates ``reprice`` moves in their own columns.

Cache savings come with it: `meterproxy.savings.cache_savings` over the same
filter's summary by model and day, the one definition the report, ``/api/summary``
and the page use too (net of cache-write premiums), so the what-if panel and the
page's savings card show the same figure for the same selection.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from meterproxy.csv_cells import safe_cell
from meterproxy.money import pico_to_usd, to_pico, usd_text
from meterproxy.pricing import PriceBook
from meterproxy.reports import compact, money
from meterproxy.savings import CacheSavings, cache_savings
from meterproxy.store.db import Db, Params
from meterproxy.store.queries import RequestFilter
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.timestamps import parse_ts
from meterproxy.usage import USAGE_FIELDS, Usage

__all__ = [
    "ModelWhatIf",
    "PriceMoment",
    "WhatIf",
    "what_if",
    "whatif_csv",
    "whatif_json",
    "whatif_table",
]

PriceMoment = Literal["dated", "today"]

_COLUMNS = (
    "id",
    "ts",
    "provider",
    "upstream",
    "model",
    "requested_model",
    "service_tier",
    "cost_pico",
    "usage_source",
    "estimated_cost_pico",
    "extra",
)


@dataclass(slots=True)
class ModelWhatIf:
    """The rows of one stored model (the model the provider answered with)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    #: Rows priced both as stored and as the target: the difference is over these.
    compared: int = 0
    actual_pico: int = 0
    as_target_pico: int = 0
    #: Rows the target has no price for (at their date), and rows unpriced as stored.
    target_unpriced: int = 0
    actual_unpriced: int = 0

    @property
    def difference_pico(self) -> int:
        return self.as_target_pico - self.actual_pico


@dataclass(slots=True)
class WhatIf:
    target: str
    target_provider: str | None
    priced_as: str | None
    prices: PriceMoment
    by_model: dict[str, ModelWhatIf] = field(default_factory=dict)
    cache: CacheSavings = field(default_factory=CacheSavings)
    #: Estimated rows (their counted tokens; costs are estimates): apart, never in `totals`.
    estimated: ModelWhatIf = field(default_factory=ModelWhatIf)

    @property
    def totals(self) -> ModelWhatIf:
        out = ModelWhatIf()
        for m in self.by_model.values():
            for name in ModelWhatIf.__slots__:
                setattr(out, name, getattr(out, name) + getattr(m, name))
        return out

    def as_dict(self) -> dict[str, Any]:
        def one(m: ModelWhatIf) -> dict[str, Any]:
            return {
                "requests": m.requests,
                "input_tokens": m.input_tokens,
                "output_tokens": m.output_tokens,
                "compared_requests": m.compared,
                "actual_cost_usd": pico_to_usd(m.actual_pico),
                "as_model_cost_usd": pico_to_usd(m.as_target_pico),
                "difference_usd": pico_to_usd(m.difference_pico),
                "as_model_unpriced_requests": m.target_unpriced,
                "actual_unpriced_requests": m.actual_unpriced,
            }

        return {
            "as_model": self.target,
            "as_provider": self.target_provider,
            "priced_as": self.priced_as,
            "prices": self.prices,
            "models": [{"model": k, **one(v)} for k, v in sorted(self.by_model.items())],
            "totals": one(self.totals),
            "estimated": one(self.estimated),
            "cache_savings": self.cache.as_dict(),
        }


def _rows(conn: Db, flt: RequestFilter, batch: int = 2000) -> Iterator[Any]:
    p = Params()
    estimated = conn.dialect.json_text("extra", p, "estimate")
    where = flt.where(p, conn.dialect)
    columns = ", ".join((*_COLUMNS, *USAGE_FIELDS))
    sql = (
        f"SELECT {columns} FROM requests WHERE (usage_source = 'reported' OR {estimated} IS NOT NULL) "
        f"AND {where}"
    )
    cursor = conn.execute(sql, p.values)
    while chunk := cursor.fetchmany(batch):
        yield from chunk


def what_if(
    conn: Db,
    flt: RequestFilter,
    book: PriceBook,
    target: str,
    *,
    target_provider: str | None = None,
    prices: PriceMoment = "dated",
    now: datetime | None = None,
) -> WhatIf:
    """Price the rows `flt` selects as `target` (see the module docstring)."""
    moment = now or datetime.now().astimezone()
    result = WhatIf(target, target_provider, book.resolve(target, target_provider), prices)
    for row in _rows(conn, flt):
        ts = parse_ts(row["ts"])
        if row["usage_source"] == "reported":
            usage = Usage(**{name: row[name] or 0 for name in USAGE_FIELDS})
            model = row["model"] or row["requested_model"] or "(unknown)"
            m = result.by_model.setdefault(model, ModelWhatIf())
            actual = row["cost_pico"]
        else:
            counted = json.loads(row["extra"]).get("estimate")
            if not isinstance(counted, dict):
                continue
            usage = Usage(
                input_tokens=int(counted.get("input_tokens") or 0),
                output_tokens=int(counted.get("output_tokens") or 0),
            )
            m, actual = result.estimated, row["estimated_cost_pico"]
        m.requests += 1
        m.input_tokens += usage.input_tokens
        m.output_tokens += usage.output_tokens
        at = ts if prices == "dated" else moment
        priced = book.price(
            model=target, usage=usage, at=at, provider=target_provider, service_tier=row["service_tier"]
        )
        if priced is None:
            m.target_unpriced += 1
        if actual is None:
            m.actual_unpriced += 1
        if priced is not None and actual is not None:
            m.compared += 1
            m.actual_pico += actual
            m.as_target_pico += to_pico(priced.cost_usd)
    result.cache = cache_savings(book, summarize(conn, SummaryQuery(flt, ["model", "day"])).groups)
    return result


# -- rendering (the report command and the API share the JSON shape) ------------------------


def whatif_json(result: WhatIf) -> str:
    def plain(o: Any) -> Any:
        if isinstance(o, Decimal):
            return usd_text(o)
        raise TypeError(type(o))

    return json.dumps(result.as_dict(), default=plain, indent=2)


def whatif_csv(result: WhatIf) -> str:
    out = io.StringIO()
    # CRLF (RFC 4180): csv quotes a field holding a line terminator's character, so a CR
    # in a name cannot start a new row with a formula in its first cell.
    writer = csv.writer(out, lineterminator="\r\n")
    doc = result.as_dict()
    columns = [
        "requests",
        "input_tokens",
        "output_tokens",
        "compared_requests",
        "actual_cost_usd",
        "as_model_cost_usd",
        "difference_usd",
        "as_model_unpriced_requests",
        "actual_unpriced_requests",
    ]
    writer.writerow(["model", *columns])
    # TOTAL, then ESTIMATED (estimate_usage rows, never in TOTAL), as the table and the JSON
    # show them; always both, so a script finds the same rows whatever the data.
    totals = [{"model": "TOTAL", **doc["totals"]}, {"model": "ESTIMATED", **doc["estimated"]}]
    for row in [*doc["models"], *totals]:
        writer.writerow(
            [
                safe_cell(str(row["model"])),
                *(usd_text(row[c]) if isinstance(row[c], Decimal) else row[c] for c in columns),
            ]
        )
    return out.getvalue()


def whatif_table(result: WhatIf) -> str:
    doc = result.as_dict()
    moment = "at each request's date" if result.prices == "dated" else "at today's prices"
    lines = [
        f"What if this traffic had gone to {result.target}"
        + (f" ({result.target_provider})" if result.target_provider else "")
        + f", priced {moment} as {result.priced_as}:",
        "",
    ]
    header = ["Model", "Requests", "Input", "Output", "Actual", f"As {result.target}", "Difference"]
    rows = [
        [
            r["model"],
            f"{r['requests']:,}",
            compact(r["input_tokens"]),
            compact(r["output_tokens"]),
            *(
                (money(r["actual_cost_usd"]), money(r["as_model_cost_usd"]), _signed(r["difference_usd"]))
                # Nothing priced both ways: say so, never an invented $0.
                if r["compared_requests"]
                else ("unpriced" if r["actual_unpriced_requests"] else "-", "unpriced", "-")
            ),
        ]
        for r in [*doc["models"], {"model": "Total", **doc["totals"]}]
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in rows[:-1])
    lines.append("  ".join("-" * w for w in widths))
    lines.append(line(rows[-1]))
    t = doc["totals"]
    left_out = []
    if t["as_model_unpriced_requests"]:
        left_out.append(f"{t['as_model_unpriced_requests']:,} the target has no price for at their date")
    if t["actual_unpriced_requests"]:
        left_out.append(f"{t['actual_unpriced_requests']:,} unpriced as stored")
    if left_out:
        lines.append(f"Compared {t['compared_requests']:,} requests; left out: " + "; ".join(left_out) + ".")
    e = doc["estimated"]
    if e["requests"]:
        # Estimates never join the totals above: one line of their own, labelled.
        priced = (
            f"{money(e['actual_cost_usd'])} as stored, {money(e['as_model_cost_usd'])} as {result.target}"
            if e["compared_requests"]
            else "none priced both ways"
        )
        lines.append(
            f"Estimated (no usage reported; meterproxy's token count, not in the totals): "
            f"{e['requests']:,} requests, {priced}."
        )
    c = doc["cache_savings"]
    lines.append(
        f"Cache savings as stored: {money(c['saved_usd'])} "
        f"({compact(c['cache_read_tokens'])} cache-read, "
        f"{compact(c['cache_write_tokens'])} cache-write tokens; net of cache-write premiums)."
    )
    return "\n".join(lines)


def _signed(value: Decimal) -> str:
    return ("+" if value > 0 else "-" if value < 0 else "") + money(abs(value))

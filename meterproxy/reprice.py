"""Recompute stored costs after a price fix, and say exactly what changed.

A row's cost is computed once, when the request finishes, with the tables of
that moment. When a table is corrected later (a wrong entry fixed with
``correction = ...``, a model added that was unpriced), `reprice` runs the
same pricing function the meter uses (`meterproxy.meter.price_record_with`)
over the stored rows of a time range and writes ``cost_usd`` (exact text),
``cost_pico`` (integer picodollars, via `meterproxy.money.to_pico`) and
``priced_model`` together, so the two cost columns can never disagree.

Rows with reported (or partial) usage are repriced into those columns. Rows
whose cost meterproxy estimated (``estimate_usage``: no usage was reported, the
tokens it counted are in ``extra.estimate``) are re-estimated from those counted
tokens into ``estimated_cost_usd``/``estimated_cost_pico`` and
``extra.estimate``, never into ``cost_usd``: an estimate stays apart from spend
(`meterproxy.estimate`), and the report counts them apart too. Other rows
without trusted usage have no cost to recompute. Dated entries mean a correct
table never changes history: repricing with unchanged tables changes nothing.

The rollups move with the rows, in the same transaction: each changed row that
is already rolled up is taken out and folded back in
(`meterproxy.store.rollups.changing_row`), so every summed measure follows.

It is safe beside a running proxy on the same database: rows are read and
written in keyset batches (``ts, id``) of `batch_size`, each batch's updates in
one short ``BEGIN IMMEDIATE`` transaction, on a WAL connection with a busy
timeout, retrying a bounded number of times if the proxy's writer holds the
lock. The proxy only ever inserts, so there is nothing to merge.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterproxy.meter import PriceFunction, price_record_with
from meterproxy.money import from_pico, stored_cost_text, to_pico
from meterproxy.pricing import PriceBook
from meterproxy.store.backend import connect
from meterproxy.store.db import Db, Params, db_errors
from meterproxy.store.rollups import changing_row
from meterproxy.timestamps import parse_ts
from meterproxy.usage import USAGE_FIELDS, RequestRecord, Usage

__all__ = ["ModelChange", "RepriceReport", "reprice"]

_TOKEN_COLUMNS = USAGE_FIELDS
_COLUMNS = (
    "id, ts, source, provider, upstream, model, requested_model, service_tier, cost_pico, "
    "estimated_cost_pico, priced_model, extra, usage_source, provider_cost_usd, cost_source, "
    + ", ".join(_TOKEN_COLUMNS)
)
_UPDATE = (
    "UPDATE requests SET cost_usd = $1, cost_pico = $2, priced_model = $3, extra = $4, cost_source = $5 "
    "WHERE id = $6"
)
_UPDATE_ESTIMATE = (
    "UPDATE requests SET estimated_cost_usd = $1, estimated_cost_pico = $2, extra = $3, cost_source = $4 "
    "WHERE id = $5"
)
_END_OF_TIME = "9999-12-31T23:59:59.999999Z"
_LOCK_RETRIES = 8


@dataclass(slots=True)
class ModelChange:
    """Changed rows of one model (the model the provider answered with).

    A row counts as changed when its cost or its ``priced_model`` changes.
    """

    rows: int = 0
    old_usd: Decimal = Decimal(0)
    new_usd: Decimal = Decimal(0)

    @property
    def difference(self) -> Decimal:
        return self.new_usd - self.old_usd


@dataclass(slots=True)
class RepriceReport:
    """What `reprice` found; totals are over every scanned row (null costs count as 0).

    The ``estimates_*`` and ``*_estimated`` figures are the estimated rows'
    (`meterproxy.estimate`), kept apart from spend as they are in the store.
    """

    scanned: int = 0
    changed: int = 0
    newly_priced: int = 0
    now_unpriced: int = 0
    old_total: Decimal = Decimal(0)
    new_total: Decimal = Decimal(0)
    by_model: dict[str, ModelChange] = field(default_factory=dict)
    dry_run: bool = False
    kept_source_cost: int = 0  # imported rows whose cost the source reported, left as they were
    estimates_scanned: int = 0
    estimates_changed: int = 0
    old_estimated: Decimal = Decimal(0)
    new_estimated: Decimal = Decimal(0)

    @property
    def difference(self) -> Decimal:
        return self.new_total - self.old_total


def reprice(
    db: str | Path,
    book: PriceBook,
    *,
    since: str,
    until: str | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
    upstream_prices: Mapping[str, str] | None = None,
    source_costs: bool = False,
) -> RepriceReport:
    """Reprice reported rows with ``since <= ts < until`` (stored ``ts`` text form).

    `upstream_prices` is the ``serve`` setting of the same name: rows are repriced
    from the same price list the proxy chose for them. Imported rows whose cost came
    from the agent's own log (``extra.cost_from = "source"``) keep it unless
    `source_costs` is set; then our price replaces it where we have one.
    """
    price = price_record_with(book, upstream_prices)
    report = RepriceReport(dry_run=dry_run)
    conn = connect(db)
    try:
        if conn.execute(conn.dialect.table_exists, ["requests"]).fetchone() is None:
            raise ValueError(f"{db}: no requests table (is this a meterproxy database?)")
        for batch in _batches(conn, since, until or _END_OF_TIME, batch_size):
            updates: list[tuple[str, str, tuple[Any, ...]]] = []
            for row in batch:
                extra = json.loads(row["extra"] or "{}")
                if row["usage_source"] not in ("reported", "partial"):
                    update = _reestimate(row, extra, price, report)
                else:
                    update = _reprice(row, extra, price, report, source_costs)
                if update is not None:
                    updates.append((row["id"], *update))
            if updates and not dry_run:
                _write(conn, updates)
    finally:
        conn.close()
    return report


def _reprice(
    row: Any, extra: dict[str, Any], price: PriceFunction, report: RepriceReport, source_costs: bool
) -> tuple[str, tuple[Any, ...]] | None:
    """The update of a row with reported usage, if its cost changes (counted in `report`)."""
    from_source = extra.get("cost_from") == "source"
    if from_source and not source_costs:
        report.kept_source_cost += 1
        return None
    record = _record(row)
    price(record)
    if from_source and record.cost_usd is None:
        report.kept_source_cost += 1  # asked, but our tables cannot price it either
        return None
    new_pico = to_pico(record.cost_usd) if record.cost_usd is not None else None
    old_pico = row["cost_pico"]
    source = record.cost_source if new_pico is not None else None
    differs = (
        new_pico != old_pico or record.priced_model != row["priced_model"] or source != row["cost_source"]
    )
    _count(report, row, old_pico, new_pico, differs)
    if not (differs or from_source):
        return None
    if source != "provider":
        extra.pop("cost_from", None)
    new_extra = json.dumps(extra, default=str) if extra else None
    return _UPDATE, (stored_cost_text(new_pico), new_pico, record.priced_model, new_extra, source)


def _reestimate(
    row: Any, extra: dict[str, Any], price: PriceFunction, report: RepriceReport
) -> tuple[str, tuple[Any, ...]] | None:
    """The update of an estimated row, if its estimate's price changes (counted in `report`).

    Priced exactly as `meterproxy.estimate.Estimator` priced it when the row was
    written: the counted tokens as reported usage, on a copy of the row.
    """
    estimate = extra.get("estimate")
    if not isinstance(estimate, dict):
        return None  # no usage and nothing counted: no cost to recompute
    record = _record(row)
    record.usage = Usage(
        input_tokens=int(estimate.get("input_tokens") or 0),
        output_tokens=int(estimate.get("output_tokens") or 0),
    )
    record.usage_source, record.provider_cost_usd = "reported", None
    price(record)
    new_pico = to_pico(record.cost_usd) if record.cost_usd is not None else None
    old_pico = row["estimated_cost_pico"]
    report.estimates_scanned += 1
    report.old_estimated += from_pico(old_pico) or Decimal(0)
    report.new_estimated += from_pico(new_pico) or Decimal(0)
    if new_pico == old_pico and record.priced_model == estimate.get("priced_model"):
        return None
    report.estimates_changed += 1
    estimate["cost_usd"] = None if record.cost_usd is None else str(record.cost_usd)
    estimate["priced_model"] = record.priced_model
    source = "estimated" if new_pico is not None else None
    return _UPDATE_ESTIMATE, (stored_cost_text(new_pico), new_pico, json.dumps(extra, default=str), source)


def _batches(conn: Db, since: str, until: str, size: int) -> Iterator[list[Any]]:
    p = Params()
    estimated = conn.dialect.json_text("extra", p, "estimate")
    rows_with_a_cost = f"(usage_source IN ('reported', 'partial') OR {estimated} IS NOT NULL)"
    sql = (
        f"SELECT {_COLUMNS} FROM requests WHERE {rows_with_a_cost} AND ts >= $2 AND ts < $3 "
        "AND (ts > $4 OR (ts = $4 AND id > $5)) ORDER BY ts, id LIMIT $6"
    )
    last_ts, last_id = "", ""
    while True:
        # The lower bound moves with the cursor so each batch is an index range, not a rescan.
        low = max(since, last_ts)
        rows = conn.execute(sql, (*p.values, low, until, last_ts, last_id, size)).fetchall()
        if not rows:
            return
        yield rows
        last_ts, last_id = rows[-1]["ts"], rows[-1]["id"]


def _record(row: Any) -> RequestRecord:
    usage = Usage(**{c: row[c] or 0 for c in _TOKEN_COLUMNS})
    return RequestRecord(
        id=row["id"],
        ts=parse_ts(row["ts"]),
        source=row["source"] or "proxy",
        provider=row["provider"] or "",
        upstream=row["upstream"] or "",
        model=row["model"],
        requested_model=row["requested_model"],
        service_tier=row["service_tier"],
        usage=usage,
        usage_source=row["usage_source"],
        # A provider's own figure is kept where the tables still cannot price the row.
        provider_cost_usd=Decimal(row["provider_cost_usd"]) if row["provider_cost_usd"] is not None else None,
    )


def _count(report: RepriceReport, row: Any, old: int | None, new: int | None, differs: bool) -> None:
    old_usd = from_pico(old) or Decimal(0)
    new_usd = from_pico(new) or Decimal(0)
    report.scanned += 1
    report.old_total += old_usd
    report.new_total += new_usd
    if not differs:
        return
    report.changed += 1
    report.newly_priced += old is None
    report.now_unpriced += new is None
    key = row["model"] or row["requested_model"] or "(no model)"
    change = report.by_model.setdefault(key, ModelChange())
    change.rows += 1
    change.old_usd += old_usd
    change.new_usd += new_usd


def _write(conn: Db, updates: list[tuple[str, str, tuple[Any, ...]]]) -> None:
    """One short transaction; if the proxy's writer holds the lock past busy_timeout, retry."""
    delay = 0.05
    for attempt in range(_LOCK_RETRIES):
        try:
            with conn.transaction():
                # The rollups move with the rows, in the same transaction (the writer's roll-up
                # pass cannot run in between: the transaction holds the write lock).
                rolled = conn.execute(conn.dialect.table_exists, ["rollup_state"]).fetchone() is not None
                for rid, sql, values in updates:
                    with changing_row(conn, rid) if rolled else nullcontext():
                        conn.execute(sql, [*values, rid])
            return
        except db_errors():
            if attempt == _LOCK_RETRIES - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

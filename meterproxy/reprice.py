"""Recompute stored costs after a price fix, and say exactly what changed.

A row's cost is computed once, when the request finishes, with the tables of
that moment. When a table is corrected later (a wrong entry fixed with
``correction = ...``, a model added that was unpriced), `reprice` runs the
same pricing function the meter uses (`meterproxy.meter.price_record_with`)
over the stored rows of a time range and writes ``cost_usd`` (exact text),
``cost_pico`` (integer picodollars, via `meterproxy.money.to_pico`) and
``priced_model`` together, so the two cost columns can never disagree.

Only rows with ``usage_source = 'reported'`` are touched: rows without trusted
usage have no cost to recompute. Dated entries mean a correct table never
changes history: repricing with unchanged tables changes nothing.

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
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterproxy.meter import price_record_with
from meterproxy.money import from_pico, stored_cost_text, to_pico
from meterproxy.pricing import PriceBook
from meterproxy.store.backend import connect
from meterproxy.store.db import Db, db_errors
from meterproxy.store.rollups import reprice_row
from meterproxy.timestamps import parse_ts
from meterproxy.usage import USAGE_FIELDS, RequestRecord, Usage

__all__ = ["ModelChange", "RepriceReport", "reprice"]

_TOKEN_COLUMNS = USAGE_FIELDS
_SELECT = (
    "SELECT id, ts, source, provider, upstream, model, requested_model, service_tier, cost_pico, "
    f"priced_model, extra, usage_source, provider_cost_usd, cost_source, {', '.join(_TOKEN_COLUMNS)} "
    "FROM requests WHERE usage_source IN ('reported', 'partial') AND ts >= $1 AND ts < $2 "
    "AND (ts > $3 OR (ts = $3 AND id > $4)) ORDER BY ts, id LIMIT $5"
)
_UPDATE = (
    "UPDATE requests SET cost_usd = $1, cost_pico = $2, priced_model = $3, extra = $4, cost_source = $6 "
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
    """What `reprice` found; totals are over every scanned row (null costs count as 0)."""

    scanned: int = 0
    changed: int = 0
    newly_priced: int = 0
    now_unpriced: int = 0
    old_total: Decimal = Decimal(0)
    new_total: Decimal = Decimal(0)
    by_model: dict[str, ModelChange] = field(default_factory=dict)
    dry_run: bool = False
    kept_source_cost: int = 0  # imported rows whose cost the source reported, left as they were

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
            updates = []
            for row in batch:
                extra = json.loads(row["extra"] or "{}")
                from_source = extra.get("cost_from") == "source"
                if from_source and not source_costs:
                    report.kept_source_cost += 1
                    continue
                record = _record(row)
                price(record)
                if from_source and record.cost_usd is None:
                    report.kept_source_cost += 1  # asked, but our tables cannot price it either
                    continue
                new_pico = to_pico(record.cost_usd) if record.cost_usd is not None else None
                old_pico = row["cost_pico"]
                source = record.cost_source if new_pico is not None else None
                differs = (
                    new_pico != old_pico
                    or record.priced_model != row["priced_model"]
                    or source != row["cost_source"]
                )
                _count(report, row, old_pico, new_pico, differs)
                if differs or from_source:
                    if source != "provider":
                        extra.pop("cost_from", None)
                    new_extra = json.dumps(extra, default=str) if extra else None
                    text = stored_cost_text(new_pico)
                    updates.append(
                        (text, new_pico, record.priced_model, new_extra, row["id"], source, old_pico)
                    )
            if updates and not dry_run:
                _write(conn, updates)
    finally:
        conn.close()
    return report


def _batches(conn: Db, since: str, until: str, size: int) -> Iterator[list[Any]]:
    last_ts, last_id = "", ""
    while True:
        # The lower bound moves with the cursor so each batch is an index range, not a rescan.
        low = max(since, last_ts)
        rows = conn.execute(_SELECT, (low, until, last_ts, last_id, size)).fetchall()
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


def _write(conn: Db, updates: list[tuple[Any, ...]]) -> None:
    """One short transaction; if the proxy's writer holds the lock past busy_timeout, retry."""
    delay = 0.05
    for attempt in range(_LOCK_RETRIES):
        try:
            with conn.transaction():
                # The rollups move with the rows, in the same transaction (the writer's roll-up
                # pass cannot run in between: the transaction holds the write lock).
                rolled = conn.execute(conn.dialect.table_exists, ["rollup_state"]).fetchone() is not None
                for *values, old_pico in updates:
                    if rolled:
                        reprice_row(conn, values[4], old_pico, values[1])
                    conn.execute(_UPDATE, values)
            return
        except db_errors():
            if attempt == _LOCK_RETRIES - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

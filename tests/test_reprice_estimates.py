"""``reprice`` re-estimates estimated rows into their own columns, and the rollups follow, on both engines.

Rows without usage whose tokens meterproxy counted (``estimate_usage``) carry an
estimated cost priced with the tables of the moment they were written. After a
price fix, ``reprice`` prices the counted tokens again (as the estimator did)
into ``estimated_cost_usd``/``estimated_cost_pico`` and ``extra.estimate``,
never into ``cost_usd``. Half the rows are rolled up before the reprice (the
state a long-running server is in); afterwards the summary's estimated cost and
spend equal the rows' sums to the picodollar, in total and per model. The
what-if prices estimated rows apart from the totals, equal to a reprice of them
renamed to the target.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterproxy.commands.reprice import format_report
from meterproxy.estimate import Estimator, load_tokenizer
from meterproxy.meter import price_record_with
from meterproxy.money import to_pico
from meterproxy.pricing import PriceBook
from meterproxy.reprice import reprice
from meterproxy.store import backend
from meterproxy.store.queries import RequestFilter
from meterproxy.store.rollups import roll_up
from meterproxy.store.summary import SummaryQuery, summarize
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import EstimateSource, RequestRecord, Usage
from meterproxy.whatif import WhatIf, what_if, whatif_table
from tests.helpers.pg import store_on
from tests.helpers.stores import WRONG

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)
#: Estimated rows of these models, and every fourth row reported gpt-4o-mini usage.
ESTIMATED = ("gpt-4o-mini", "gpt-4.1-nano", "our-private-llm")
#: The fix also prices the private model, which the tables did not know when its rows were written.
PRIVATE = """
provider = "openai"
[[models]]
id = "our-private-llm"
[[models.prices]]
effective_from = 2024-01-01T00:00:00Z
input = 0.5
output = 2
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with store_on(request.param, tmp_path) as url:
        yield url


def _records(book: PriceBook, n: int, start: datetime) -> list[RequestRecord]:
    estimator = Estimator(load_tokenizer(None), lambda: price_record_with(book))
    price = price_record_with(book)
    out = []
    for i in range(n):
        ts = start + timedelta(minutes=7 * i)
        if i % 4 == 3:
            r = make_record(model="gpt-4o-mini", ts=ts, usage=Usage(1000 + i, 0, 0, 0, 17 * i))
            price(r)
        else:
            r = make_record(model=ESTIMATED[i % 4], ts=ts)
            r.usage, r.usage_source = None, "missing"  # a stream that reported no usage
            prompt = {"messages": [{"role": "user", "content": "Name a river. " * (10 + i)}]}
            answer = {"choices": [{"message": {"content": "The Nile flows north. " * (5 + i)}}]}
            r.estimate_source = EstimateSource(
                request=json.dumps(prompt).encode(), response=json.dumps(answer).encode(), truncated=False
            )
            estimator.prepare(r)
            assert r.estimate is not None and r.cost_usd is None
        out.append(r)
    return out


def _rows(db: str) -> list[dict[str, Any]]:
    conn = backend.read_connection(db)
    try:
        rows = conn.execute(
            "SELECT id, model, cost_usd, cost_pico, cost_source, estimated_cost_usd, estimated_cost_pico, "
            "input_tokens, output_tokens, extra FROM requests"
        ).fetchall()
        return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]
    finally:
        conn.close()


def _summary(db: str) -> tuple[dict[str, int], dict[str | None, dict[str, int]]]:
    conn = backend.read_connection(db)
    try:
        s = summarize(conn, SummaryQuery(group_by=["model"]))
        return s.totals, {key["model"]: measures for key, measures in s.groups}
    finally:
        conn.close()


def _as_estimated_now(book: PriceBook, row: dict[str, Any]) -> int | None:
    """What the right tables make of a row's counted tokens (None: they cannot price it)."""
    counted = json.loads(row["extra"])["estimate"]
    priced = book.price(
        model=row["model"],
        usage=Usage(input_tokens=counted["input_tokens"], output_tokens=counted["output_tokens"]),
        at=T0,
        provider="openai",
    )
    return None if priced is None else to_pico(priced.cost_usd)


def test_reprice_moves_estimates_in_their_own_columns_and_the_rollups_follow(db: str, tmp_path: Path) -> None:
    wrong_file = tmp_path / "wrong.toml"
    wrong_file.write_text(WRONG)
    wrong = PriceBook.load(overrides=[wrong_file])
    private_file = tmp_path / "private.toml"
    private_file.write_text(PRIVATE)
    right = PriceBook.load(overrides=[private_file])
    writer = StoreWriter(db)
    writer.start()
    try:
        for record in _records(wrong, 24, T0):
            assert writer.submit(record)
        assert writer.call(lambda conn: roll_up(conn)).result(30) == 24  # these are in the rollups
        for record in _records(wrong, 16, T0 + timedelta(days=1)):  # and these above the watermark
            assert writer.submit(record)
        writer.call(lambda conn: None).result(30)  # the commit barrier: every row is written
    finally:
        assert writer.close(timeout=30)
    before = {r["id"]: r for r in _rows(db)}
    assert _summary(db)[0]["estimated_requests"] == 20  # the private model's estimates had no price

    report = reprice(db, right, since="2026-01-01T00:00:00.000000Z")
    text = format_report(report)

    rows = _rows(db)
    estimated = [r for r in rows if json.loads(r["extra"] or "{}").get("estimate")]
    assert len(estimated) == 30 and report.estimates_scanned == 30
    mini = [r for r in estimated if r["model"] == "gpt-4o-mini"]
    private = [r for r in estimated if r["model"] == "our-private-llm"]
    assert report.estimates_changed == len(mini) + len(private) == 20
    assert "re-estimated 30 rows without usage" in text and "changed 20" in text
    for r in estimated:
        # Never spend: no cost, no tokens; the estimate priced as the right tables price its tokens.
        assert (r["cost_usd"], r["cost_pico"], r["input_tokens"], r["output_tokens"]) == (None, None, 0, 0)
        now = _as_estimated_now(right, r)
        assert r["estimated_cost_pico"] == now
        assert (Decimal(r["estimated_cost_usd"]) if r["estimated_cost_usd"] is not None else None) == (
            None if now is None else Decimal(now).scaleb(-12)
        )
        counted = json.loads(r["extra"])["estimate"]
        assert (None if counted["cost_usd"] is None else to_pico(Decimal(counted["cost_usd"]))) == now
        assert r["cost_source"] == ("estimated" if now is not None else None)
    for r in mini:
        assert r["estimated_cost_pico"] < before[r["id"]]["estimated_cost_pico"]
    for r in private:  # newly priced: now an estimate, counted as one
        assert before[r["id"]]["estimated_cost_pico"] is None and r["estimated_cost_pico"] > 0
    assert report.changed == 10  # the reported gpt-4o-mini rows, repriced as before

    totals, by_model = _summary(db)
    assert totals["estimated_cost_pico"] == sum(r["estimated_cost_pico"] or 0 for r in rows)
    assert totals["cost_pico"] == sum(r["cost_pico"] or 0 for r in rows)
    assert totals["estimated_requests"] == sum(r["cost_source"] == "estimated" for r in rows) == 30
    for model, measures in by_model.items():
        mine = [r for r in rows if r["model"] == model]
        assert measures["estimated_cost_pico"] == sum(r["estimated_cost_pico"] or 0 for r in mine), model
        assert measures["cost_pico"] == sum(r["cost_pico"] or 0 for r in mine), model

    # The right tables again: nothing left to change.
    again = reprice(db, right, since="2026-01-01T00:00:00.000000Z")
    assert (again.changed, again.estimates_changed) == (0, 0)
    assert _summary(db)[0] == totals


def _stored_what_if(db: str, target: str) -> WhatIf:
    """Store the 24 mixed records of `_records` in ``db`` and price them as ``target`` (OpenAI)."""
    writer = StoreWriter(db)
    writer.start()
    try:
        for record in _records(PriceBook.default(), 24, T0):
            assert writer.submit(record)
    finally:
        assert writer.close(timeout=30)
    conn = backend.read_connection(db)
    try:
        return what_if(conn, RequestFilter(), PriceBook.default(), target, target_provider="openai")
    finally:
        conn.close()


def test_as_model_prices_estimates_apart_equal_to_a_reprice_of_renamed_rows(db: str) -> None:
    target = "gpt-4.1-nano"
    result = _stored_what_if(db, target)
    doc = result.as_dict()
    # Estimates are a line of their own, never in the totals (which are reported spend only).
    assert doc["totals"]["requests"] == 6
    assert doc["estimated"]["requests"] == 18
    assert doc["estimated"]["actual_unpriced_requests"] == 6  # the private model: left out, not a zero
    assert doc["estimated"]["compared_requests"] == 12
    assert "Estimated (no usage reported" in whatif_table(result)

    # The priced estimated rows renamed to the target, then repriced: the same figure.
    rows = _rows(db)
    stored = sum(r["estimated_cost_pico"] or 0 for r in rows)
    assert result.estimated.actual_pico == stored
    conn = backend.connect(db)
    try:
        with conn.transaction():
            conn.execute(
                "UPDATE requests SET model = $1, requested_model = $1 WHERE estimated_cost_pico IS NOT NULL",
                [target],
            )
    finally:
        conn.close()
    reprice(db, PriceBook.default(), since="2026-01-01T00:00:00.000000Z")
    renamed = [r for r in _rows(db) if r["model"] == target and r["cost_source"] == "estimated"]
    assert len(renamed) == 12
    assert result.estimated.as_target_pico == sum(r["estimated_cost_pico"] for r in renamed)
    assert result.estimated.as_target_pico != stored


def test_every_output_of_report_carries_the_estimates_apart(tmp_path: Path) -> None:
    # The table, --json and --csv of `report` and of `report --as-model` say the same about
    # estimated rows: a line (CSV: a row, or columns) of their own, never in the totals.
    import csv
    import io

    from click.testing import CliRunner

    from meterproxy.cli import main

    db = str(tmp_path / "m.db")
    result = _stored_what_if(db, "gpt-4.1-nano")
    estimated = result.as_dict()["estimated"]

    def cli(*args: str) -> str:
        out = CliRunner().invoke(main, ["report", *args, "--db", db, "--since", "2026-06-01"])
        assert out.exit_code == 0, out.output
        return out.output

    rows = list(csv.DictReader(io.StringIO(cli("model", "--as-model", "gpt-4.1-nano", "--csv"), newline="")))
    assert [r["model"] for r in rows[-2:]] == ["TOTAL", "ESTIMATED"]
    total, est = rows[-2], rows[-1]
    assert int(total["requests"]) == 6 and int(est["requests"]) == estimated["requests"] == 18
    assert int(est["compared_requests"]) == 12 and int(est["actual_unpriced_requests"]) == 6
    assert Decimal(est["actual_cost_usd"]) == estimated["actual_cost_usd"] > 0
    assert Decimal(est["as_model_cost_usd"]) == estimated["as_model_cost_usd"] > 0
    doc = json.loads(cli("model", "--as-model", "gpt-4.1-nano", "--json"), parse_float=Decimal)
    assert Decimal(doc["estimated"]["as_model_cost_usd"]) == Decimal(est["as_model_cost_usd"])

    # The plain report: the JSON totals, the CSV rows' own columns and the table's line agree
    # (the summaries count priced estimates: the private model's 6 have no price).
    totals = json.loads(cli("model", "--json"))["totals"]
    by_model = list(csv.DictReader(io.StringIO(cli("model", "--csv"), newline="")))
    assert sum(int(r["estimated_requests"]) for r in by_model) == totals["estimated_requests"] == 12
    assert sum(Decimal(r["estimated_cost_usd"]) for r in by_model) == Decimal(totals["estimated_cost_usd"])
    assert sum(Decimal(r["cost_usd"] or 0) for r in by_model) == Decimal(totals["cost_usd"])
    assert "Estimated (no usage reported, not in the totals): 12 requests" in cli("model")

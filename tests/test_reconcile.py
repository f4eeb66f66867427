"""``meterproxy reconcile``: our records against the provider's organisation usage and cost reports.

A fake provider on 127.0.0.1 answers the admin endpoints in the documented
shapes (OpenAI's ``page``/``bucket`` objects with ``organization.usage.*`` and
``organization.costs.result`` results, unix-second buckets, ``amount.value`` in
dollars; Anthropic's ``data``/``results`` with RFC 3339 buckets and ``amount`` in
cents as a decimal string), paginated, and checks what the command sends.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.meter import price_record_with
from meterproxy.pricing import PriceBook
from meterproxy.store.writer import StoreWriter
from meterproxy.testing import make_record
from meterproxy.usage import RequestRecord, Usage

DAY1 = datetime(2026, 11, 2, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
DAY3 = DAY2 + timedelta(days=1)


class FakeAdminApi:
    """Serves canned pages per path; the first page of each says has_more, to test paging."""

    def __init__(self, pages: dict[str, list[dict[str, Any]]]) -> None:
        self.pages = pages
        self.seen: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.seen.append((url.path, query, {k.lower(): v for k, v in self.headers.items()}))
                docs = api.pages.get(url.path)
                if docs is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                index = int(query.get("page", ["0"])[0])
                doc = dict(docs[index])
                doc["has_more"] = index + 1 < len(docs)
                doc["next_page"] = str(index + 1) if doc["has_more"] else None
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeAdminApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _store(db: Path, records: list[RequestRecord]) -> None:
    price = price_record_with(PriceBook.default())
    writer = StoreWriter(db)
    writer.start()
    for r in records:
        price(r)
        assert writer.submit(r)
    assert writer.close(timeout=30)


def _rec(model: str, day: datetime, upstream: str, inp: int, out: int, **usage: int) -> RequestRecord:
    return make_record(
        model=model,
        upstream=upstream,
        provider=upstream,
        ts=day + timedelta(hours=10),
        usage=Usage(input_tokens=inp, output_tokens=out, **usage),
    )


def _cost(r: RequestRecord) -> Decimal:
    assert r.cost_usd is not None
    return r.cost_usd


@pytest.fixture
def openai_setup(tmp_path: Path) -> Iterator[tuple[Path, FakeAdminApi, list[RequestRecord]]]:
    db = tmp_path / "m.db"
    mini1 = _rec("gpt-4o-mini-2024-07-18", DAY1, "openai", 12000, 800)
    mini2 = _rec("gpt-4o-mini-2024-07-18", DAY2, "openai", 30000, 2000)
    big2 = _rec("gpt-4o-2024-08-06", DAY2, "openai", 5000, 400)
    ours_only = _rec("o4-mini-2025-04-16", DAY3, "openai", 700, 90)
    records = [mini1, mini2, big2, ours_only]
    _store(db, records)

    def usage_result(model: str, inp: int, out: int, n: int) -> dict[str, Any]:
        return {
            "object": "organization.usage.completions.result",
            "input_tokens": inp,
            "output_tokens": out,
            "input_cached_tokens": 0,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": n,
            "project_id": None,
            "user_id": None,
            "api_key_id": None,
            "model": model,
            "batch": None,
        }

    def bucket(day: datetime, results: list[dict[str, Any]]) -> dict[str, Any]:
        start = int(day.timestamp())
        return {"object": "bucket", "start_time": start, "end_time": start + 86400, "results": results}

    def cost(model: str, kind: str, value: Decimal) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            "amount": {"value": float(value), "currency": "usd"},
            "line_item": f"{model}, {kind}",
            "project_id": None,
        }

    usage_pages = [
        {"object": "page", "data": [bucket(DAY1, [usage_result("gpt-4o-mini-2024-07-18", 12000, 800, 1)])]},
        {
            "object": "page",
            "data": [
                bucket(
                    DAY2,
                    [
                        usage_result("gpt-4o-mini-2024-07-18", 30000, 2000, 1),
                        usage_result("gpt-4o-2024-08-06", 5000, 400, 1),
                    ],
                ),
                # A whole day of gpt-4.1 that never went through the proxy.
                bucket(DAY3, [usage_result("gpt-4.1-2025-04-14", 90000, 5000, 12)]),
            ],
        },
    ]
    # The provider's dollars: equal to ours except gpt-4o-mini on day 2, billed 1.5x.
    cost_pages = [
        {
            "object": "page",
            "data": [
                bucket(DAY1, [cost("gpt-4o-mini-2024-07-18", "input", _cost(mini1))]),
                bucket(
                    DAY2,
                    [
                        cost("gpt-4o-mini-2024-07-18", "input", _cost(mini2)),
                        cost("gpt-4o-mini-2024-07-18", "output", _cost(mini2) / 2),
                        cost("gpt-4o-2024-08-06", "input", _cost(big2)),
                    ],
                ),
                bucket(DAY3, [cost("gpt-4.1-2025-04-14", "input", Decimal("0.22"))]),
            ],
        }
    ]
    pages = {
        "/v1/organization/usage/completions": usage_pages,
        "/v1/organization/usage/embeddings": [{"object": "page", "data": []}],
        "/v1/organization/costs": cost_pages,
    }
    with FakeAdminApi(pages) as api:
        yield db, api, records


def test_openai_reconcile_finds_bypass_and_price_difference(
    openai_setup: tuple[Path, FakeAdminApi, list[RequestRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, api, _ = openai_setup
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-test-123")
    args = ["reconcile", "openai", "--since", "2026-11-02", "--until", "2026-11-04", "--db", str(db)]
    out = CliRunner().invoke(main, [*args, "--base-url", api.url, "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    verdicts = {(r["day"], r["model"]): r["verdict"] for r in doc["rows"]}
    assert verdicts == {
        ("2026-11-02", "gpt-4o-mini-2024-07-18"): "matched",
        ("2026-11-03", "gpt-4o-mini-2024-07-18"): "price_mismatch",
        ("2026-11-03", "gpt-4o-2024-08-06"): "matched",
        ("2026-11-04", "gpt-4.1-2025-04-14"): "missing_here",
        ("2026-11-04", "o4-mini-2025-04-16"): "missing_there",
    }
    assert doc["verdicts"]["missing_here"] == 1 and doc["verdicts"]["price_mismatch"] == 1
    bypass = next(r for r in doc["rows"] if r["verdict"] == "missing_here")
    assert bypass["provider"]["requests"] == 12 and bypass["meterproxy"]["requests"] == 0

    # What was asked: daily buckets grouped by model / line item, the admin key as Bearer, all pages.
    paths = [p for p, _, _ in api.seen]
    assert paths.count("/v1/organization/usage/completions") == 2
    for _path, query, headers in api.seen:
        assert headers["authorization"] == "Bearer sk-admin-test-123"
        assert query["bucket_width"] == ["1d"]
        assert query["start_time"] == [str(int(DAY1.timestamp()))]
        assert query["end_time"] == [str(int((DAY3 + timedelta(days=1)).timestamp()))]
    costs_query = next(q for p, q, _ in api.seen if p == "/v1/organization/costs")
    assert costs_query["group_by"] == ["line_item"]

    table = CliRunner().invoke(main, [*args, "--base-url", api.url])
    assert table.exit_code == 0, table.output
    assert "missing_here: billed by the provider, never seen by meterproxy" in table.output
    assert "price_mismatch" in table.output and "gpt-4.1-2025-04-14" in table.output


def test_reconcile_needs_the_admin_key_and_reports_http_errors(
    openai_setup: tuple[Path, FakeAdminApi, list[RequestRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, api, _ = openai_setup
    monkeypatch.delenv("OPENAI_ADMIN_KEY", raising=False)
    args = ["reconcile", "openai", "--since", "2026-11-02", "--db", str(db), "--base-url", api.url]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2 and "OPENAI_ADMIN_KEY" in out.output
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-x")
    api.pages.pop("/v1/organization/costs")
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "answered 404" in out.output
    assert "sk-admin-x" not in out.output


def test_anthropic_reconcile_counts_cache_tokens_and_cents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "m.db"
    ours = _rec(
        "claude-sonnet-4-5-20250929",
        DAY1,
        "anthropic",
        50000,
        3000,
        cache_read_tokens=20000,
        cache_write_tokens=10000,
    )
    _store(db, [ours])
    cents = _cost(ours) * 100
    usage = {
        "data": [
            {
                "starting_at": "2026-11-02T00:00:00Z",
                "ending_at": "2026-11-03T00:00:00Z",
                "results": [
                    {
                        "uncached_input_tokens": 20000,
                        "cache_creation": {
                            "ephemeral_1h_input_tokens": 0,
                            "ephemeral_5m_input_tokens": 10000,
                        },
                        "cache_read_input_tokens": 20000,
                        "output_tokens": 3000,
                        "server_tool_use": {"web_search_requests": 0},
                        "api_key_id": None,
                        "workspace_id": None,
                        "model": "claude-sonnet-4-5-20250929",
                        "service_tier": None,
                        "context_window": None,
                    }
                ],
            }
        ]
    }
    cost = {
        "data": [
            {
                "starting_at": "2026-11-02T00:00:00Z",
                "ending_at": "2026-11-03T00:00:00Z",
                "results": [
                    {
                        "currency": "USD",
                        "amount": str(cents),
                        "workspace_id": None,
                        "description": "Claude Sonnet 4.5 Usage - Input Tokens",
                        "cost_type": "tokens",
                        "context_window": "0-200k",
                        "model": "claude-sonnet-4-5-20250929",
                        "service_tier": "standard",
                        "token_type": "uncached_input_tokens",
                    }
                ],
            }
        ]
    }
    pages = {"/v1/organizations/usage_report/messages": [usage], "/v1/organizations/cost_report": [cost]}
    monkeypatch.setenv("ANTHROPIC_ADMIN_API_KEY", "sk-ant-admin01-test")
    with FakeAdminApi(pages) as api:
        out = CliRunner().invoke(
            main,
            [
                "reconcile",
                "anthropic",
                "--since",
                "2026-11-02",
                "--until",
                "2026-11-02",
                "--db",
                str(db),
                "--base-url",
                api.url,
                "--json",
            ],
        )
        assert out.exit_code == 0, out.output
        [row] = json.loads(out.output)["rows"]
        assert row["verdict"] == "matched", row
        assert row["provider"]["input_tokens"] == 50000
        assert Decimal(row["provider"]["cost_usd"]) == _cost(ours)
        for _, query, headers in api.seen:
            assert headers["x-api-key"] == "sk-ant-admin01-test"
            assert headers["anthropic-version"] == "2023-06-01"
            assert query["starting_at"] == ["2026-11-02T00:00:00Z"]
            assert query["ending_at"] == ["2026-11-03T00:00:00Z"]


def test_reconcile_reads_past_empty_pages_and_takes_dates_with_offsets(
    openai_setup: tuple[Path, FakeAdminApi, list[RequestRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A page with no buckets that still says has_more (the API pages by bucket count, and a
    # window can start with empty days) is followed; a datetime with an offset names the UTC day
    # it falls in: 23:00 at UTC-5 on 2 Nov is 3 Nov in UTC.
    db, api, _ = openai_setup
    api.pages["/v1/organization/usage/completions"].insert(0, {"object": "page", "data": []})
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-x")
    args = ["reconcile", "openai", "--db", str(db), "--base-url", api.url, "--json"]
    out = CliRunner().invoke(main, [*args, "--since", "2026-11-02", "--until", "2026-11-04"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["verdicts"]["missing_here"] == 1  # the gpt-4.1 day, two pages on
    assert [p for p, _, _ in api.seen].count("/v1/organization/usage/completions") == 3

    api.seen.clear()
    out = CliRunner().invoke(
        main, [*args, "--since", "2026-11-02T23:00:00-05:00", "--until", "2026-11-04T12:00:00Z"]
    )
    assert out.exit_code == 0, out.output
    _, query, _ = api.seen[0]
    assert query["start_time"] == [str(int(DAY2.timestamp()))]
    assert query["end_time"] == [str(int((DAY3 + timedelta(days=1)).timestamp()))]
    for bad in ("garbage", "2026-11-02xyz", "2026-13-01"):
        out = CliRunner().invoke(main, [*args, "--since", bad])
        assert out.exit_code == 2 and f"--since {bad!r} is not a date" in out.output


def test_reconcile_says_what_is_wrong_with_an_unreadable_answer(
    openai_setup: tuple[Path, FakeAdminApi, list[RequestRecord]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Each of these used to end in a Python traceback, or (the cursor) never end.
    db, api, _ = openai_setup
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-x")
    args = ["reconcile", "openai", "--since", "2026-11-02", "--db", str(db), "--base-url", api.url]
    completions = "/v1/organization/usage/completions"

    api.pages[completions] = [{"object": "page", "data": [{"object": "bucket", "results": []}]}]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "not in its documented shape" in out.output and "start_time" in out.output

    looping = {"object": "page", "data": [], "has_more": True, "next_page": "same"}
    with _answering(200, looping) as url:
        out = CliRunner().invoke(main, [*args[:-1], url])
    assert out.exit_code == 1 and "next_page 'same' came back" in out.output

    api.pages[completions] = [{"object": "page", "data": []}]
    api.pages.pop("/v1/organization/usage/embeddings")
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1 and "answered 404" in out.output

    out = CliRunner().invoke(main, [*args[:4], "--db", str(tmp_path / "none.db"), *args[6:]])
    assert out.exit_code == 2 and "no database at" in out.output
    assert not (tmp_path / "none.db").exists()


@contextlib.contextmanager
def _answering(status: int, doc: dict[str, Any]) -> Iterator[str]:
    """A server that answers every GET with ``status`` and ``doc``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_rejected_admin_key_exits_1_with_a_hint_and_no_key(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _store(db, [])
    refusal = {"error": {"message": "Incorrect API key provided: sk-admin-bad.", "code": "invalid_api_key"}}
    runner = CliRunner(env={"OPENAI_ADMIN_KEY": "sk-admin-bad", "ANTHROPIC_ADMIN_API_KEY": "sk-admin-bad"})
    with _answering(401, refusal) as url:
        for provider in ("openai", "anthropic"):
            args = ["reconcile", provider, "--since", "2026-11-02", "--db", str(db), "--base-url", url]
            out = runner.invoke(main, args)
            assert out.exit_code == 1, out.output
            assert "answered 401 (is" in out.output and "admin key" in out.output
            assert "sk-admin-bad" not in out.output

"""Claude Code and Codex CLI through ``meterproxy serve``, as their users run them (issue 20).

Each test drives the real CLI (``claude -p``, ``codex exec``; see
`tests.helpers.agents` for the sandbox: temp HOME, no network but 127.0.0.1)
against fake providers replaying real event shapes, and checks what was
recorded: exact tokens, the session and user as the agent names them, no junk
rows, budget refusals the agent shows and stops on, and imports of the agent's
own log counted once. Tests that need no CLI check the same rules through the
official SDKs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from meterproxy.app_state import WRITER
from meterproxy.pricing import PriceBook
from meterproxy.store.rollups import roll_up
from meterproxy.store.schema import record_to_row
from meterproxy.store.writer import INSERT_REQUEST as INSERT_ROW
from meterproxy.testing import FakeUpstream, Reply, load_fixture
from meterproxy.usage import RequestRecord, Usage
from tests.conftest import ProxyFactory
from tests.helpers.agents import (
    CLAUDE,
    CODEX,
    AgentProviders,
    Sentinel,
    agent_env,
    need,
    run_cli,
    serve,
)
from tests.helpers.budgets import wait_for
from tests.helpers.pg import fresh_database, pg_or_skip
from tests.helpers.sdk import SDK_TIMEOUT

STREAM = load_fixture("anthropic_messages_stream").expect
RESPONSES = load_fixture("openai_responses_stream").expect
#: A budget spent by the first request: the second one in its scope is refused.
TINY = "0.000000001"


@pytest.fixture
async def providers(upstream: FakeUpstream) -> AgentProviders:
    fake = AgentProviders(upstream)
    fake.install()
    return fake


def claude_env(home: Path, sentinel: Sentinel, proxy_url: str, **extra: str) -> dict[str, str]:
    return agent_env(
        home,
        sentinel,
        ANTHROPIC_BASE_URL=f"{proxy_url}/anthropic",
        ANTHROPIC_API_KEY="sk-ant-api03-test-key-000000",
        **extra,
    )


def codex_env(home: Path, sentinel: Sentinel, proxy_url: str, provider_entry: bool = False) -> dict[str, str]:
    """Codex pointed at the proxy the two ways README's "Coding agents" gives."""
    # Codex 0.171 ignores OPENAI_BASE_URL: its config file names the endpoint.
    if provider_entry:
        config = (
            'model_provider = "meterproxy"\n\n[model_providers.meterproxy]\n'
            'name = "OpenAI through meterproxy"\n'
            f'base_url = "{proxy_url}/v1"\nenv_key = "OPENAI_API_KEY"\nwire_api = "responses"\n'
            'http_headers = { "X-Meter-Tags" = "team=search" }\n'
        )
    else:
        config = f'openai_base_url = "{proxy_url}/v1"\n'
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(
        "check_for_update_on_startup = false\n" + config + "\n[analytics]\nenabled = false\n"
    )
    return agent_env(home, sentinel, OPENAI_API_KEY="sk-proj-test-key-000000")


def claude_user_id(providers: AgentProviders) -> dict[str, str]:
    """Claude Code's ``metadata.user_id`` as it reached the provider, decoded."""
    bodies = [
        json.loads(r.body) for r in providers.upstream.received if r.path_qs.startswith("/v1/messages?")
    ]
    assert bodies, "Claude Code sent no /v1/messages request"
    decoded: dict[str, str] = json.loads(bodies[-1]["metadata"]["user_id"])
    return decoded


async def test_claude_code_tokens_session_user_and_cost_as_claude_counts_them(
    providers: AgentProviders, tmp_path: Path
) -> None:
    claude = need(CLAUDE, "claude")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url) as served:
        env = claude_env(
            tmp_path / "home", sentinel, served.url, ANTHROPIC_CUSTOM_HEADERS="X-Meter-Tags: team=search"
        )
        run = await run_cli([claude, "-p", "say hello", "--output-format", "json"], env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        result = json.loads(run.stdout)
        rows = await served.wait_rows(1)
    assert sentinel.attempts == [], "no connection anywhere but 127.0.0.1"

    assert [r["endpoint"] for r in rows] == ["messages"], "one request, no junk rows"
    (row,) = rows
    assert row["status"] == 200 and row["error"] is None and row["usage_source"] == "reported"
    for name in (
        "input_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "output_tokens",
    ):
        assert row[name] == STREAM[name], name
    # Claude Code's own count of the same answer agrees, token for token and to the cent.
    usage = result["usage"]
    assert row["output_tokens"] == usage["output_tokens"]
    assert row["input_tokens"] == (
        usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    )
    assert Decimal(row["cost_usd"]) == Decimal(str(result["total_cost_usd"]))
    # Session: the X-Claude-Code-Session-Id Claude Code sends, the one it prints.
    assert row["session"] == result["session_id"]
    # User: the device id out of metadata.user_id's JSON (no account when using an API key).
    user_id = claude_user_id(providers)
    assert user_id["session_id"] == result["session_id"]
    assert row["user"] == (user_id.get("account_uuid") or user_id["device_id"])
    assert not row["user"].startswith("{")
    assert json.loads(row["tags"]) == {"team": "search"}
    assert row["provider_request_id"] == providers.request_ids[-1]
    # meterproxy's own header is not forwarded; the agent's are, untouched.
    (sent,) = [r for r in providers.upstream.received if r.path_qs.startswith("/v1/messages")]
    assert "x-meter-tags" not in sent.headers
    assert sent.headers["x-claude-code-session-id"] == result["session_id"]


async def test_codex_over_the_responses_websocket_is_metered_with_its_session(
    providers: AgentProviders, tmp_path: Path
) -> None:
    codex = need(CODEX, "codex")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url) as served:
        env = codex_env(tmp_path / "home", sentinel, served.url)
        args = [codex, "exec", "--json", "--skip-git-repo-check", "-m", "gpt-5.3-codex", "say hello"]
        run = await run_cli(args, env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        rows = await served.wait_rows(2)
    # Codex still looks up GitHub and chatgpt.com (plugins, model catalog); the sentinel
    # refused each, and the run went on: nothing but 127.0.0.1 was reached.

    # Codex speaks the Responses API over a WebSocket first, as OpenAI serves it: the proxy
    # tunnels it to the provider (one upgrade, no fallback, no retries) and meters the turn
    # from its response.completed: one row per response, Codex's prewarm (generate: false,
    # nothing generated) being the first.
    assert [(r.method, r.path_qs) for r in providers.upstream.received] == [("GET", "/v1/responses")]
    assert "Reconnecting" not in run.stderr + run.stdout
    assert [r["endpoint"] for r in rows] == ["responses", "responses"], "no junk rows"
    prewarm, row = rows
    assert (prewarm["input_tokens"], prewarm["output_tokens"]) == (0, 0)
    assert json.loads(prewarm["extra"])["ws_session"] == json.loads(row["extra"])["ws_session"]
    assert row["status"] == 101 and row["error"] is None and row["usage_source"] == "reported"
    for name in ("input_tokens", "cache_read_tokens", "output_tokens", "reasoning_tokens"):
        assert row[name] == RESPONSES[name], name
    events = run.json_lines()
    (started,) = [e for e in events if e.get("type") == "thread.started"]
    (completed,) = [e for e in events if e.get("type") == "turn.completed"]
    # Codex's own count of the turn agrees with the row.
    assert completed["usage"]["input_tokens"] == row["input_tokens"]
    assert completed["usage"]["output_tokens"] == row["output_tokens"]
    # Session: the session-id header Codex sends, the thread id it prints.
    assert row["session"] == started["thread_id"]
    assert row["model"] == "gpt-5.3-codex" and row["cost_usd"] is not None
    assert row["provider_request_id"] == providers.request_ids[-1]


def block_budget(name: str, upstream: str) -> str:
    scope = f'scope = {{ upstream = "{upstream}" }}'
    return f'[[budgets]]\nname = "{name}"\n{scope}\nlimit_usd = "{TINY}"\naction = "block"\n'


async def test_claude_code_stops_at_once_on_a_spent_budget_and_says_why(
    providers: AgentProviders, tmp_path: Path
) -> None:
    claude = need(CLAUDE, "claude")
    config = block_budget("claude-cap", "anthropic")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url, config) as served:
        env = claude_env(tmp_path / "home", sentinel, served.url)
        first = await run_cli([claude, "-p", "say hello"], env, tmp_path)
        assert first.returncode == 0, first.stderr + first.stdout
        await served.wait_budget_state("claude-cap", "blocking")
        # Claude Code retries a 429 up to ten times with backoff, unless told not to
        # (x-should-retry: false): one refused request, the reason printed, exit 1.
        second = await run_cli([claude, "-p", "say hello again"], env, tmp_path)
        rows = await served.wait_rows(2)
    assert second.returncode != 0
    assert "claude-cap" in second.stdout + second.stderr
    assert "429" in second.stdout + second.stderr
    assert len([r for r in providers.upstream.received if r.method == "POST"]) == 1, "blocked before upstream"
    assert [(r["status"], r["usage_source"]) for r in rows] == [(200, "reported"), (429, "none")]
    assert "claude-cap" in rows[1]["error"] and rows[1]["cost_usd"] is None


async def test_codex_stops_at_once_on_a_spent_budget_with_quota_exceeded(
    providers: AgentProviders, tmp_path: Path
) -> None:
    codex = need(CODEX, "codex")
    config = block_budget("codex-cap", "openai")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url, config) as served:
        env = codex_env(tmp_path / "home", sentinel, served.url)
        args = [codex, "exec", "--skip-git-repo-check", "-m", "gpt-5.3-codex"]
        first = await run_cli([*args, "say hello"], env, tmp_path)
        assert first.returncode == 0, first.stderr + first.stdout
        await served.wait_budget_state("codex-cap", "blocking")
        # insufficient_quota is final for Codex: no retry (it would otherwise sleep out the
        # retry-after, weeks for a monthly budget), "Quota exceeded" printed, exit 1.
        second = await run_cli([*args, "say hello again"], env, tmp_path)
        rows = await served.wait_rows(3)
    assert second.returncode != 0
    assert "Quota exceeded" in second.stdout + second.stderr
    assert "Reconnecting" not in second.stdout + second.stderr
    # The first run's one WebSocket reached the provider; the second was refused at the gate.
    assert len(providers.upstream.received) == 1, "blocked before upstream"
    # The first run: its prewarm and its turn. The second: the refused upgrade (Codex may try
    # the same request once over HTTPS after a refused WebSocket; that one is refused too).
    assert [(r["status"], r["endpoint"]) for r in rows[:2]] == [(101, "responses"), (101, "responses")]
    refused = rows[2:]
    assert 1 <= len(refused) <= 2 and {(r["status"], r["endpoint"]) for r in refused} == {(429, "responses")}
    assert all("codex-cap" in r["error"] for r in refused)


async def test_sdks_do_not_retry_a_budget_refusal_even_with_retries_on(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    """openai and anthropic SDKs at their default max_retries (2): one attempt, then the error."""
    upstream.replay(load_fixture("openai_chat_json"))
    upstream.replay(load_fixture("anthropic_messages_json"))
    proxy = await make_proxy(budgets=[{"name": "all", "limit_usd": TINY, "action": "block"}])
    oa = openai.AsyncOpenAI(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/v1", api_key="sk-x")
    ant = anthropic.AsyncAnthropic(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x")
    assert oa.max_retries == 2 and ant.max_retries == 2
    await oa.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "x"}])
    await proxy.rows(1)
    with pytest.raises(openai.RateLimitError) as oa_err:
        await oa.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "x"}])
    assert oa_err.value.code == "insufficient_quota" and "'all'" in oa_err.value.message
    with pytest.raises(anthropic.RateLimitError) as ant_err:
        await ant.messages.create(
            model="claude-sonnet-4-20250514", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert "'all'" in ant_err.value.message
    rows = await proxy.rows(3)
    assert [r["status"] for r in rows] == [200, 429, 429], "each SDK made exactly one attempt"
    assert len(upstream.received) == 1


def import_claude_code_cli(projects: Path, db: Path) -> str:
    """``meterproxy import claude-code`` as a user runs it; returns its summary line."""
    done = subprocess.run(
        [sys.executable, "-m", "meterproxy", "import", "claude-code", str(projects), "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "METERPROXY_DB": str(db)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_claude_code_import_counts_each_request_once_in_either_order(
    providers: AgentProviders, tmp_path: Path
) -> None:
    claude = need(CLAUDE, "claude")
    home = tmp_path / "home"
    projects = home / ".claude" / "projects"
    async with Sentinel() as sentinel, serve(tmp_path / "first", providers.upstream.url) as served:
        env = claude_env(home, sentinel, served.url)
        run = await run_cli([claude, "-p", "say hello"], env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        (proxied,) = await served.wait_rows(1)
        # Import after the proxy: the transcript's entry has the proxied row's request id.
        summary = import_claude_code_cli(projects, served.db)
        assert "0 new" in summary and "1 already proxied" in summary, summary
        assert [(r["source"], r["provider_request_id"]) for r in served.rows()] == [
            ("proxy", proxied["provider_request_id"])
        ]

        # The proxy after the import (it committed later than the import ran): a fresh
        # database gets the transcript first, then the same provider request proxied.
        async with serve(tmp_path / "second", providers.upstream.url) as second:
            summary = import_claude_code_cli(projects, second.db)
            assert "1 new" in summary, summary
            (imported,) = second.rows()
            assert imported["source"] == "claude-code"
            assert imported["provider_request_id"] == proxied["provider_request_id"]
            providers.reuse_request_id = proxied["provider_request_id"]
            env = claude_env(home, sentinel, second.url)
            again = await run_cli([claude, "-p", "say hello", "--output-format", "json"], env, tmp_path)
            assert again.returncode == 0, again.stderr + again.stdout
            # The proxied row replaces the imported one (it has the session, user and key).
            rows = await second.wait_until(
                lambda rows: [r["source"] for r in rows] == ["proxy"], "the imported duplicate to go"
            )
    assert rows[0]["provider_request_id"] == proxied["provider_request_id"]
    assert rows[0]["session"] == json.loads(again.stdout)["session_id"]


async def test_claude_code_fast_mode_is_priced_at_fast_rates(
    providers: AgentProviders, tmp_path: Path
) -> None:
    claude = need(CLAUDE, "claude")
    providers.speed = "fast"
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url) as served:
        env = claude_env(tmp_path / "home", sentinel, served.url)
        run = await run_cli([claude, "-p", "say hello", "--output-format", "json"], env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        (row,) = await served.wait_rows(1)
    book = PriceBook.default()
    usage = Usage(
        input_tokens=STREAM["input_tokens"],
        cache_read_tokens=STREAM["cache_read_tokens"],
        cache_write_tokens=STREAM["cache_write_tokens"],
        cache_write_1h_tokens=STREAM["cache_write_1h_tokens"],
        output_tokens=STREAM["output_tokens"],
    )
    at = datetime.now(UTC)
    standard = book.price(model=row["model"], usage=usage, at=at, provider="anthropic")
    fast = book.price(model=row["model"], usage=usage, at=at, provider="anthropic", service_tier="fast")
    assert standard is not None and fast is not None and fast.tier == "fast"
    assert row["service_tier"] == "fast"
    assert Decimal(row["cost_usd"]) == fast.cost_usd == 2 * standard.cost_usd
    # Claude Code read the same answer as fast and prices it the same, to the cent.
    result = json.loads(run.stdout)
    assert result["usage"]["speed"] == "fast"
    assert Decimal(row["cost_usd"]) == Decimal(str(result["total_cost_usd"]))


async def test_head_probe_and_count_tokens_are_not_usage(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    """Claude Code's start-up ``HEAD`` of its base URL and a token count: no error, no cost."""
    upstream.reply("/v1/messages/count_tokens", Reply(body=b'{"input_tokens":1234}'))
    proxy = await make_proxy()
    # As Claude Code sends it: fetch(ANTHROPIC_BASE_URL, {method: "HEAD"}).
    async with aiohttp.ClientSession() as client, client.head(f"{proxy.url}/anthropic") as response:
        assert response.status == 404  # what the fake answers on "/", passed through
    ant = anthropic.AsyncAnthropic(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x")
    counted = await ant.messages.count_tokens(
        model="claude-sonnet-4-20250514", messages=[{"role": "user", "content": "x"}]
    )
    assert counted.input_tokens == 1234
    (row,) = await proxy.rows(1)
    assert [r.method for r in upstream.received] == ["HEAD", "POST"], "the probe was forwarded"
    assert row["endpoint"] == "count_tokens" and row["usage_source"] == "none"
    assert row["status"] == 200 and row["error"] is None and row["input_tokens"] == 0


async def test_codex_through_a_model_providers_entry_with_tags(
    providers: AgentProviders, tmp_path: Path
) -> None:
    codex = need(CODEX, "codex")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url) as served:
        env = codex_env(tmp_path / "home", sentinel, served.url, provider_entry=True)
        args = [codex, "exec", "--json", "--skip-git-repo-check", "-m", "gpt-5.3-codex", "say hello"]
        run = await run_cli(args, env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        (row,) = await served.wait_rows(1)
    (started,) = [e for e in run.json_lines() if e.get("type") == "thread.started"]
    assert row["session"] == started["thread_id"]
    assert json.loads(row["tags"]) == {"team": "search"}
    assert row["output_tokens"] == RESPONSES["output_tokens"] and row["cost_usd"] is not None
    (sent,) = providers.upstream.received
    assert "x-meter-tags" not in sent.headers, "meterproxy's own header stops at the proxy"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_proxied_row_replaces_an_already_rolled_up_import_without_double_counting(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path, backend: str
) -> None:
    """Proxy after import, when the imported row is already in the rollups: counted once."""
    fixture = load_fixture("anthropic_messages_json")
    upstream.replay(fixture, headers={"request-id": "req_011CSameRequest"})
    imported = RequestRecord(
        source="claude-code",
        upstream="claude-code",
        provider="anthropic",
        model="claude-sonnet-4-20250514",
        usage=Usage(input_tokens=999, output_tokens=999),
        usage_source="reported",
        provider_request_id="req_011CSameRequest",
    )
    with ExitStack() as stack:
        if backend == "postgresql":
            pg_or_skip()
            proxy = await make_proxy(db=stack.enter_context(fresh_database()), rollup_interval=3600)
        else:
            proxy = await make_proxy(rollup_interval=3600)
        writer = proxy.app[WRITER]

        def import_one(conn: sqlite3.Connection) -> int:
            # What `meterproxy import` leaves (on PostgreSQL via `meterproxy migrate`): the row
            # and the file it came from; then the rollups take the row in.
            conn.execute(INSERT_ROW, list(record_to_row(imported)))
            conn.execute(
                "INSERT INTO import_files (source, path, \"offset\") VALUES ('claude-code', 's.jsonl', 1)"
            )
            return roll_up(conn)

        assert await asyncio.wrap_future(writer.call(import_one)) == 1

        ant = anthropic.AsyncAnthropic(
            timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x"
        )
        await ant.messages.create(
            model="claude-sonnet-4-20250514", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )

        def sources(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute("SELECT source FROM requests ORDER BY source")]

        async def only_proxied() -> bool:
            return await asyncio.wrap_future(writer.call(sources)) == ["proxy"]

        await wait_for(only_proxied, what="the imported duplicate to be dropped")

        def rolled(conn: sqlite3.Connection) -> tuple[int, int, int]:
            roll_up(conn)
            row = conn.execute(
                "SELECT SUM(requests), SUM(input_tokens), SUM(output_tokens) FROM rollup_day"
            ).fetchone()
            return (int(row[0]), int(row[1]), int(row[2]))

        totals = await asyncio.wrap_future(writer.call(rolled))
        assert totals == (1, fixture.expect["input_tokens"], fixture.expect["output_tokens"])


async def test_claude_code_start_up_probe_is_forwarded_but_not_recorded(
    providers: AgentProviders, tmp_path: Path
) -> None:
    """Claude Code's ``HEAD`` of ANTHROPIC_BASE_URL: no error row, no unmetered row.

    Claude Code skips that probe when any HTTP(S)_PROXY is set, so this one run has
    no sentinel; the runs above show that with these settings it connects nowhere else.
    """
    claude = need(CLAUDE, "claude")
    async with Sentinel() as sentinel, serve(tmp_path, providers.upstream.url) as served:
        env = claude_env(tmp_path / "home", sentinel, served.url)
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(name)
        run = await run_cli([claude, "-p", "say hello"], env, tmp_path)
        assert run.returncode == 0, run.stderr + run.stdout
        await served.wait_rows(1)
        # Every exchange finished (each has handed its record to the writer, or not); then a
        # marker request, recorded after anything the probe could have left.
        await served.wait_idle()
        async with aiohttp.ClientSession() as client, client.get(f"{served.url}/anthropic/v1/models") as got:
            assert got.status == 404
        rows = await served.wait_rows(2)
    probes = [r for r in providers.upstream.received if r.method == "HEAD"]
    assert [(r.method, r.path_qs) for r in probes] == [("HEAD", "/")], "the probe reached the provider"
    assert [(r["method"], r["endpoint"]) for r in rows] == [("POST", "messages"), ("GET", "models")], (
        "the probe left no row"
    )


async def test_agent_attribution_and_x_meter_override(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    """Claude Code's JSON user id and session header; X-Meter-* always win."""
    upstream.replay(load_fixture("anthropic_messages_json"))
    proxy = await make_proxy()
    ant = anthropic.AsyncAnthropic(timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/anthropic", api_key="sk-ant-x")

    def claude_user(account: str) -> str:
        return json.dumps({"device_id": "dev-9f2c", "account_uuid": account, "session_id": "s-body"})

    cases: list[tuple[str, dict[str, str]]] = [
        (claude_user("acct-42"), {}),
        (claude_user(""), {"X-Claude-Code-Session-Id": "s-header"}),
        (claude_user("acct-42"), {"X-Meter-User": "alice", "X-Meter-Session": "run-1"}),
        ("bob", {}),
    ]
    for user_id, headers in cases:
        await ant.messages.create(
            model="claude-sonnet-4-20250514",
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            metadata={"user_id": user_id},
            extra_headers=headers,
        )
        await proxy.rows(len(upstream.received))
    rows = await proxy.rows(4)
    assert [(r["user"], r["session"]) for r in rows] == [
        ("acct-42", "s-body"),
        ("dev-9f2c", "s-header"),
        ("alice", "run-1"),
        ("bob", None),
    ]

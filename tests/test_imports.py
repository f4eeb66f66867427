"""Imports of agents' local logs: realistic files, duplicates, snapshots, malformed lines, growth.

The CLI runs in-process through click's runner against a real SQLite file;
expected costs come from the price book applied to token counts read off the
fixture by hand, so a wrong mapping (e.g. cache tokens not counted as input)
changes the figures and fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meterproxy.cli import main
from meterproxy.imports import ImportStats, ImportStore
from meterproxy.imports.jsonl import LineMapping, follow, read_new
from meterproxy.pricing import PriceBook
from meterproxy.store import backend
from meterproxy.testing import make_record
from meterproxy.timestamps import parse_ts
from meterproxy.usage import RequestRecord, Usage
from tests.helpers.pg import store_on
from tests.helpers.waits import WAIT_S

LOGS = Path(__file__).parent / "fixtures" / "agent_logs"
WEBAPP = "5b2c1f0e-8d3a-4c61-9e2f-0a7d4b1c9e33"
API = "c0ffee00-1234-4abc-8def-556677889900"


def rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY ts, id")]
    finally:
        conn.close()


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def price(model: str, at: str, **tokens: int) -> Decimal:
    when = parse_ts(at)
    found = PriceBook.default().price(model=model, usage=Usage(**tokens), at=when, provider="anthropic")
    assert found is not None
    return found.cost_usd


@pytest.fixture
def claude_dir(tmp_path: Path) -> Path:
    target = tmp_path / "home" / ".claude" / "projects"
    shutil.copytree(LOGS / "claude" / "projects", target)
    return target


def test_claude_code_import_dedups_snapshots_and_skips_synthetic(claude_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    result = run("import", "claude-code", str(claude_dir), "--db", str(db))
    got = rows(db)
    assert len(got) == 5  # 2 snapshots -> 1, synthetic and malformed skipped, repeated line once
    assert {r["source"] for r in got} == {"claude-code"}
    first = got[0]
    # the largest snapshot of msg_01WebappAnswerOne won
    assert first["output_tokens"] == 312
    assert first["input_tokens"] == 3 + 12850 and first["cache_write_tokens"] == 12850
    assert first["session"] == WEBAPP
    assert json.loads(first["tags"]) == {"project": "-home-alice-code-webapp"}
    assert Decimal(first["cost_usd"]) == price(
        "claude-sonnet-4", first["ts"], input_tokens=12853, cache_write_tokens=12850, output_tokens=312
    )
    second = got[1]
    assert (second["cache_read_tokens"], second["cache_write_1h_tokens"]) == (12850, 2040)
    assert Decimal(second["cost_usd"]) == price(
        "claude-sonnet-4",
        second["ts"],
        input_tokens=5 + 2040 + 12850,
        cache_read_tokens=12850,
        cache_write_tokens=2040,
        cache_write_1h_tokens=2040,
        output_tokens=58,
    )
    side = got[2]
    assert json.loads(side["tags"])["sidechain"] == "true" and side["priced_model"] == "claude-3-5-haiku"
    search = got[3]
    assert search["web_search_requests"] == 2 and search["session"] == API
    assert all(r["model"] != "<synthetic>" for r in got)
    # malformed lines are reported with file and line, never fatal
    assert f"{WEBAPP}.jsonl:7: not JSON" in result.output
    assert f"{WEBAPP}.jsonl:10: usage.input_tokens" in result.output
    assert f"{API}.jsonl:5: not JSON" in result.output

    again = run("import", "claude-code", str(claude_dir), "--db", str(db))
    assert "0 new" in again.output and len(rows(db)) == 5
    assert rows(db) == got


def test_claude_code_bigger_snapshot_later_replaces_smaller(claude_dir: Path, tmp_path: Path) -> None:
    """A run that saw only the first snapshot is corrected when the file grows."""
    db = tmp_path / "m.db"
    log = claude_dir / "-home-alice-code-webapp" / f"{WEBAPP}.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:3]) + lines[3][:40])  # second snapshot half-written
    run("import", "claude-code", str(claude_dir), "--db", str(db))
    early = [r for r in rows(db) if r["session"] == WEBAPP]
    assert [r["output_tokens"] for r in early] == [1]
    log.write_bytes(b"".join(lines))
    result = run("import", "claude-code", str(claude_dir), "--db", str(db))
    assert "1 updated" in result.output
    later = [r for r in rows(db) if r["session"] == WEBAPP]
    assert later[0]["id"] == early[0]["id"] and later[0]["output_tokens"] == 312
    assert len(later) == 3


def test_claude_code_default_roots_from_home(claude_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("METERPROXY_DB", str(tmp_path / "env.db"))
    run("import", "claude-code")
    assert len(rows(tmp_path / "env.db")) == 5


def test_zeroclaw_import_prices_and_dedups(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    log = tmp_path / "costs.jsonl"
    shutil.copy(LOGS / "zeroclaw_costs.jsonl", log)
    result = run("import", "jsonl", str(log), "--format", "zeroclaw", "--db", str(db))
    got = rows(db)
    assert len(got) == 4 and {r["source"] for r in got} == {"zeroclaw"}
    assert "1 already imported" in result.output and "1 malformed" in result.output
    by_model = {(r["model"], r["input_tokens"]): r for r in got}
    sonnet = by_model[("anthropic/claude-sonnet-4", 1520)]
    assert sonnet["priced_model"] == "claude-sonnet-4" and sonnet["provider"] == "anthropic"
    assert Decimal(sonnet["cost_usd"]) == price(
        "claude-sonnet-4", sonnet["ts"], input_tokens=1520, output_tokens=380
    )
    assert Decimal(sonnet["provider_cost_usd"]) == Decimal("0.01026")
    # only a total: kept as input tokens, cost is the source's own figure
    total_only = by_model[("gpt-4o-mini", 700)]
    assert total_only["priced_model"] is None and Decimal(total_only["cost_usd"]) == Decimal("0.000231")
    assert json.loads(total_only["extra"])["cost_from"] == "source"
    again = run("import", "jsonl", str(log), "--format", "zeroclaw", "--db", str(db))
    assert "0 new" in again.output and "0 lines" in again.output  # resumed at the stored offset


def test_generic_mapping(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    log = tmp_path / "agent.jsonl"
    log.write_text(
        json.dumps({"t": 1763800000, "m": "gpt-4o", "u": {"in": 1000, "out": 50}, "who": "bob"})
        + "\n"
        + json.dumps({"t": "2025-11-22T10:00:00+02:00", "m": "gpt-4o", "u": {"in": 10, "out": 5}})
        + "\n"
    )
    maps = ["ts=t", "model=m", "input_tokens=u.in", "output_tokens=u.out", "user=who"]
    args = [a for m in maps for a in ("--map", m)]
    run("import", "jsonl", str(log), *args, "--source", "my-agent", "--db", str(db))
    got = rows(db)
    assert [r["source"] for r in got] == ["my-agent", "my-agent"]
    assert got[0]["ts"].startswith("2025-11-22T08:00:00") and got[1]["user"] == "bob"
    assert got[1]["priced_model"] == "gpt-4o" and got[1]["cost_usd"] is not None
    bad = CliRunner().invoke(main, ["import", "jsonl", str(log), "--db", str(db)])
    assert bad.exit_code == 2 and "--map" in bad.output


ZC = LineMapping.preset("zeroclaw")


def zc_line(n: int, tokens: int = 100) -> bytes:
    usage = {"model": "gpt-4o-mini", "input_tokens": tokens, "output_tokens": 10}
    usage["timestamp"] = f"2026-11-22T08:{n // 60:02d}:{n % 60:02d}Z"
    return (json.dumps({"id": f"line-{n}", "session_id": "s", "usage": usage}) + "\n").encode()


def test_tail_resumes_after_restart_and_waits_for_partial_line(tmp_path: Path) -> None:
    db, log = tmp_path / "m.db", tmp_path / "costs.jsonl"
    book = PriceBook.default()
    log.write_bytes(zc_line(1) + zc_line(2) + zc_line(3)[:20])
    with ImportStore(db) as store:
        stats = read_new(store, book, log, ZC)
    assert stats.inserted == 2
    with open(log, "ab") as fh:
        fh.write(zc_line(3)[20:] + zc_line(4))
    with ImportStore(db) as store:  # a new process: resumes from the stored offset
        stats = read_new(store, book, log, ZC)
        assert (stats.lines, stats.inserted, stats.malformed) == (2, 2, [])
        assert store.file_state("zeroclaw", os.path.abspath(log)).offset == log.stat().st_size  # type: ignore[union-attr]
    assert len(rows(db)) == 4


def test_tail_survives_truncation_and_rotation(tmp_path: Path) -> None:
    db, log = tmp_path / "m.db", tmp_path / "costs.jsonl"
    book = PriceBook.default()
    log.write_bytes(zc_line(1) + zc_line(2) + zc_line(3))
    with ImportStore(db) as store:
        read_new(store, book, log, ZC)
        # truncated in place (copytruncate), then new lines: all read from the start
        with open(log, "r+b") as fh:
            fh.truncate(0)
        log.write_bytes(zc_line(10))
        assert read_new(store, book, log, ZC).inserted == 1
        # rewritten with the same size but other content: head hash differs -> from the start
        log.write_bytes(zc_line(11))
        assert read_new(store, book, log, ZC).inserted == 1
        # rotation: lines appended to the old file after our last read, then renamed away
        with open(log, "ab") as fh:
            fh.write(zc_line(12))
        log.rename(tmp_path / "costs.jsonl.1")
        log.write_bytes(zc_line(13))
        stats = read_new(store, book, log, ZC)
        assert stats.inserted == 2 and stats.duplicates == 0  # 12 from the old file, 13 from the new
    assert len(rows(db)) == 7  # lines 1-3, 10, 11, 12, 13: none lost, none doubled


def test_follow_imports_lines_as_the_file_grows(tmp_path: Path) -> None:
    db, log = tmp_path / "m.db", tmp_path / "costs.jsonl"
    log.write_bytes(zc_line(1))
    stop, all_in = threading.Event(), threading.Event()
    seen: list[int] = []

    def on_pass(stats: Any) -> None:  # the follower's own signal after each pass
        seen.append(stats.inserted)
        if stats.inserted >= 5:
            all_in.set()

    with ImportStore(db) as store:
        worker = threading.Thread(
            target=follow,
            args=(store, PriceBook.default(), log, ZC, stop),
            kwargs={"interval": 0.02, "on_pass": on_pass},
        )
        worker.start()
        try:
            for n in range(2, 6):
                with open(log, "ab") as fh:
                    fh.write(zc_line(n))
            assert all_in.wait(10), f"the follower inserted {seen[-1:]} of 5"
        finally:
            stop.set()
            worker.join(10)
    assert seen[-1] == 5 and len(rows(db)) == 5


def test_replacing_a_rolled_up_snapshot_keeps_rollups_exact(claude_dir: Path, tmp_path: Path) -> None:
    """A bigger snapshot replacing a row already folded into the rollups must not count twice."""
    rollups = pytest.importorskip("meterproxy.store.rollups")
    db = tmp_path / "m.db"
    log = claude_dir / "-home-alice-code-webapp" / f"{WEBAPP}.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:3]))
    with ImportStore(db) as store, store.conn.transaction():
        rollups.roll_up(store.conn)
    log.write_bytes(b"".join(lines))
    run("import", "claude-code", str(claude_dir), "--db", str(db))
    store_conn = backend.connect(db)
    with store_conn.transaction():
        rollups.roll_up(store_conn)
    store_conn.close()
    conn = sqlite3.connect(db)
    raw = conn.execute("SELECT sum(output_tokens), count(*), sum(cost_pico) FROM requests").fetchone()
    tables = [
        t
        for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'rollup_*'"
        )
    ]
    assert {"rollup_hour", "rollup_day"} <= set(tables)
    for table in (t for t in tables if t != "rollup_state"):
        rolled = conn.execute(
            f"SELECT sum(output_tokens), sum(requests), sum(cost_pico) FROM {table}"
        ).fetchone()
        assert rolled == raw
    conn.close()


def test_follow_command_stops_on_sigterm_and_resumes(tmp_path: Path) -> None:
    """The real CLI in its own process: tail, stop with SIGTERM, restart, nothing lost or doubled."""
    import signal
    import subprocess
    import sys

    db, log = tmp_path / "m.db", tmp_path / "costs.jsonl"
    log.write_bytes(zc_line(1))
    cmd = [sys.executable, "-m", "meterproxy", "import", "jsonl", str(log), "--format", "zeroclaw"]
    cmd += ["--follow", "--interval", "0.05", "--db", str(db)]

    def wait_rows(n: int, proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if db.exists() and len(rows(db)) >= n:
                    return
            except sqlite3.OperationalError:
                pass  # the file exists but the importer has not created the table yet
            time.sleep(0.05)
        raise AssertionError(f"expected {n} rows; importer exited {proc.poll()}")

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_rows(1, proc)
        with open(log, "ab") as fh:
            fh.write(zc_line(2) + zc_line(3)[:30])  # a partial line stays unread
        wait_rows(2, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err
    assert "2 new" in out
    with open(log, "ab") as fh:
        fh.write(zc_line(3)[30:] + zc_line(4))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_rows(4, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0 and "2 new" in out, (out, err)
    assert len(rows(db)) == 4


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_large_batch_goes_in_as_one_bulk_load_on_either_engine(engine: str, tmp_path: Path) -> None:
    """600 entries (PostgreSQL: ``COPY``, past insert_many's 256-row threshold), with repeats: the
    first of an id wins, a larger later one replaces it whether stored earlier or in this batch."""
    with store_on(engine, tmp_path) as db:

        def entry(n: int, output_tokens: int) -> RequestRecord:
            usage = Usage(input_tokens=10 + n, output_tokens=output_tokens)
            return make_record(id=f"imp-{n:04d}", source="zeroclaw", usage=usage)

        with ImportStore(db) as store:
            first = ImportStats()
            store.write([entry(n, 5) for n in range(0, 600, 100)], first, keep="largest")
            batch = [entry(n, 5) for n in range(600)]
            # A repeat; a larger one of an id new in this batch; a larger one of a stored id.
            batch += [entry(7, 5), entry(8, 50), entry(200, 99)]
            stats = ImportStats()
            store.write(batch, stats, keep="largest")
            assert (first.inserted, stats.inserted, stats.replaced, stats.duplicates) == (6, 594, 2, 7)
            got = store.conn.execute(
                "SELECT id, input_tokens, output_tokens FROM requests ORDER BY id"
            ).fetchall()
        assert len(got) == 600
        assert [tuple(r) for r in got] == [
            (f"imp-{n:04d}", 10 + n, {8: 50, 200: 99}.get(n, 5)) for n in range(600)
        ]

"""``meterproxy prices list|show|check`` through the real click entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner

from meterproxy.budgets.definition import BudgetScope
from meterproxy.cli import main
from meterproxy.pricing import PriceBook

ROOT = Path(__file__).resolve().parent.parent

VLLM_OVERRIDE = """
provider = "vllm"
[[models]]
id = "my-llama"
aliases = ["meta-llama/Llama-3.1-8B-Instruct"]
[[models.prices]]
effective_from = 2025-01-01T00:00:00Z
input = 0.02
output = 0.06
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_list_is_aligned_and_filters_by_provider() -> None:
    code, out, _ = run("prices", "list", "--provider", "anthropic")
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    header, rows = lines[0], lines[1:-1]
    assert header.split()[:4] == ["PROVIDER", "MODEL", "INPUT", "OUTPUT"]
    assert rows and all(r.split()[0] == "anthropic" for r in rows)
    # Aligned: the MODEL column starts at the same offset on every line.
    col = header.index("MODEL")
    assert all(r[col - 2 : col] == "  " and r[col] != " " for r in rows)
    sonnet = next(r for r in rows if r.split()[1] == "claude-sonnet-4-5")
    assert sonnet.split()[2:6] == ["3", "15", "0.3", "3.75"]
    assert "claude-sonnet-4.5" in sonnet


def test_list_json_matches_the_book() -> None:
    code, out, _ = run("prices", "list", "--json")
    assert code == 0
    rows = json.loads(out, parse_float=Decimal)
    book = PriceBook.default()
    curated = [r["model"] for r in rows if r["layer"] != "base"]
    assert sorted(curated) == book.models()
    # The base layer's models are listed too, on their price list (Together's only from genai-prices).
    assert any(r["provider"] == "together" and r["layer"] == "base" for r in rows)
    by_id = {r["model"]: r for r in rows}
    history = book.history("gpt-4o-mini")
    assert by_id["gpt-4o-mini"]["input"] == history[-1].rates.input
    assert by_id["gpt-4o-mini"]["provider"] == "openai"


def test_list_includes_override_models(tmp_path: Path) -> None:
    override = tmp_path / "vllm.toml"
    override.write_text(VLLM_OVERRIDE)
    code, out, _ = run("prices", "list", "--provider", "vllm", "--pricing", str(override))
    assert code == 0
    assert "my-llama" in out and "0.02" in out and "0.06" in out
    code, _, err = run("prices", "list", "--provider", "vllm")
    assert code != 0 and "no models" in err


def test_show_resolves_snapshots_prefixes_and_prints_history() -> None:
    code, out, _ = run("prices", "show", "gpt-4o-2024-08-06")
    assert code == 0
    assert out.startswith("gpt-4o-2024-08-06 -> gpt-4o")
    assert "2024-08-06T00:00:00+00:00" in out and "tier batch: x0.5" in out
    code, out, _ = run("prices", "show", "anthropic/claude-sonnet-4.5", "--provider", "openrouter")
    assert code == 0
    # OpenRouter's own list (the base layer), with the layer and source shown.
    assert "base layer: genai-prices openrouter/anthropic/claude-sonnet-4.5" in out
    assert "above 200000 input tokens" in out and "[base]" in out


def test_show_dated_history_and_multiplier_from_override(tmp_path: Path) -> None:
    override = tmp_path / "contract.toml"
    override.write_text(
        'provider = "openai"\n[[models]]\nid = "gpt-4o"\n[[models.prices]]\n'
        'effective_from = 2026-01-01T00:00:00Z\ninput = 2\noutput = 8\nnote = "new list price"\n'
        "[[models.multipliers]]\neffective_from = 2026-02-01T00:00:00Z\nmultiplier = 0.9\n"
    )
    code, out, _ = run("prices", "show", "gpt-4o", "--pricing", str(override))
    assert code == 0
    lines = out.splitlines()
    dated = [line for line in lines if line[:4].isdigit()]
    assert [d[:10] for d in dated] == ["2024-08-06", "2026-01-01"]
    assert "note: new list price" in out
    assert "multiplier x0.9 on model from 2026-02-01" in out


def test_show_unknown_model_exits_1() -> None:
    code, out, err = run("prices", "show", "no-such-model-7")
    assert code == 1 and out == ""
    assert "is not in any price list" in err


def test_check_ok_on_shipped_tables() -> None:
    code, out, _ = run("prices", "check")
    assert code == 0 and out.startswith("ok: ")


def test_check_lists_every_problem_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'provider = "openai"\n'
        '[[models]]\nid = "cheap"\naliases = ["gpt-4o"]\n'
        "[[models.prices]]\neffective_from = 2025-01-01\ninput = -1\noutput = 1\n"
        "[[models.prices]]\neffective_from = 2025-01-01\ninput = 1\noutput = 1\ncolour = 1\n"
    )
    code, out, err = run("prices", "check", "--pricing", str(bad))
    assert code == 1 and out == ""
    assert "problem(s)" in err.splitlines()[0]
    for needle in ("input is negative (-1)", "duplicate effective_from", "'gpt-4o' collides", "'colour'"):
        assert needle in err, needle
    assert all(str(bad) in line for line in err.splitlines()[1:])


def test_check_unreadable_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "naive.toml"
    bad.write_text(
        'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\n'
        "effective_from = 2025-01-01T00:00:00\ninput = 1\noutput = 1\n"
    )
    code, _, err = run("prices", "check", "--pricing", str(bad))
    assert code == 1
    assert str(bad) in err and "UTC offset" in err and "Traceback" not in err


def test_installed_console_script_runs_check() -> None:
    """What CI runs: the real `meterproxy` executable in a subprocess."""
    exe = Path(sys.executable).with_name("meterproxy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from meterproxy.cli import main; main()"]
    done = subprocess.run([*cmd, "prices", "check"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")


def test_show_and_list_time_of_day_windows() -> None:
    code, out, _ = run("prices", "show", "deepseek-v4-pro")
    assert code == 0
    assert "2026-08-23T00:00:00+00:00  [curated]  input 0.66, output 1.98, cache_read 0.022" in out
    assert (
        "    window peak 06:00-10:00 UTC mon,tue,wed,thu,fri: input 1.32, output 3.96, cache_read 0.044"
    ) in out
    code, out, _ = run("prices", "show", "deepseek-chat")
    assert "    window off-peak 16:30-00:30 UTC: input 0.135, output 0.55, cache_read 0.035" in out
    assert "correction: added 2026-11-25" in out

    code, out, _ = run("prices", "list", "--provider", "deepseek")
    assert code == 0
    marked = {line.split()[1] for line in out.splitlines() if line.startswith("deepseek ")}
    assert {"deepseek-v4-pro*", "deepseek-flash*", "deepseek-chat"} <= marked
    assert "time-of-day rates" in out

    code, out, _ = run("prices", "list", "--provider", "deepseek", "--json")
    rows = {r["model"]: r for r in json.loads(out, parse_float=Decimal)}
    windows = rows["deepseek-v4-pro"]["windows"]
    assert [(w["start_utc"], w["end_utc"]) for w in windows] == [
        ("01:00:00", "04:00:00"),
        ("06:00:00", "10:00:00"),
    ]
    assert windows[0]["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert windows[0]["input"] == Decimal("1.32") and rows["deepseek-v4-pro"]["input"] == Decimal("0.66")
    assert rows["deepseek-chat"]["windows"] == []


def test_check_reports_overlapping_windows(tmp_path: Path) -> None:
    bad = tmp_path / "tod.toml"
    bad.write_text(
        'provider = "x"\n[[models]]\nid = "m"\n[[models.prices]]\neffective_from = 2025-01-01\n'
        'input = 1\noutput = 1\n[[models.prices.windows]]\nstart = "16:30"\nend = "00:30"\n'
        '[[models.prices.windows]]\nstart = "00:00"\nend = "01:00"\ninput = 2\n'
    )
    code, _, err = run("prices", "check", "--pricing", str(bad))
    assert code == 1
    assert "windows[0] (16:30-00:30 UTC) overlaps windows[1] (00:00-01:00 UTC)" in err


def test_one_provider_vocabulary_with_aliases() -> None:
    code, out, _ = run("prices", "list", "--provider", "google", "--json")
    assert code == 0
    rows = json.loads(out, parse_float=Decimal)
    assert rows and {r["provider"] for r in rows} == {"gemini"}  # rows, metrics and budgets say gemini
    assert BudgetScope(provider="google").provider == "gemini"
    assert BudgetScope(provider="x-ai").provider == "xai"


def test_show_a_moving_alias_lists_its_moves_and_unknown_spans() -> None:
    code, out, _ = run("prices", "show", "gemini-flash-latest", "--provider", "gemini")
    assert code == 0
    assert "in force now: billed as gemini-3.8-flash (redirect, curated layer)" in out
    assert "from 2025-09-25T00:00:00+00:00 billed as gemini-2.5-flash-preview-09-2025 (" in out
    assert "from 2025-12-17T00:00:00+00:00 unpriced: Gemini 3 Flash Preview (2025-12-17)" in out


def test_list_shows_an_alias_and_a_retired_name_at_what_they_bill_as_now() -> None:
    code, out, _ = run("prices", "list", "--provider", "mistral")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("mistral   mistral-large-latest "))
    assert line.split()[2:4] == ["0.5", "1.5"] and line.endswith("= mistral-large-2512")
    code, out, _ = run("prices", "list", "--provider", "xai", "--json")
    grok3 = next(r for r in json.loads(out) if r["model"] == "grok-3")
    assert grok3["same_as"] == "grok-4.3" and grok3["input"] == 1.25

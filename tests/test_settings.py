"""Settings: precedence, validation, and the README staying true to the settings table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meterproxy.settings import DEFAULT_UPSTREAMS, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_config_env_cli(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('port = 9000\nhost = "127.0.0.2"\n[upstreams]\ngroq = "https://api.groq.com"\n')
    env = {"METERPROXY_PORT": "9100", "METERPROXY_UPSTREAMS": "local=http://127.0.0.1:8000"}
    s = load_settings(config, cli={"port": 9200, "upstreams": {"x": "http://127.0.0.1:1"}}, env=env)
    assert s.port == 9200 and s.host == "127.0.0.2"
    assert s.upstreams == {
        **DEFAULT_UPSTREAMS,
        "groq": "https://api.groq.com",
        "local": "http://127.0.0.1:8000",
        "x": "http://127.0.0.1:1",
    }


@pytest.mark.parametrize(
    "cli, needle",
    [
        ({"upstreams": {"bad": "ftp://x"}}, "not an http(s) URL"),
        ({"upstreams": {"bad": "https://h/?q=1"}}, "must not carry a query"),
        ({"port": 70000}, "port"),
        ({"log_level": "loud"}, "log_level"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_settings_name_the_setting(cli: dict[str, object], needle: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(None, cli=cli, env={})


def test_bad_config_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(SettingsError, match=re.escape("bad.toml")):
        load_settings(bad, env={})
    with pytest.raises(SettingsError, match=re.escape("missing.toml")):
        load_settings(tmp_path / "missing.toml", env={})


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`{name}`" not in readme]
    assert not missing, f"README.md does not document settings: {missing}"


def test_an_upstream_names_its_price_list_in_every_syntax(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[upstreams.tgt]\nurl = "https://api.together.xyz"\nprices = "together"\n')
    env = {"METERPROXY_UPSTREAMS": "fw=https://api.fireworks.ai/inference#prices=fireworks"}
    s = load_settings(
        config, cli={"upstreams": {"pp": "https://api.perplexity.ai#prices=Perplexity"}}, env=env
    )
    assert s.upstreams["tgt"] == "https://api.together.xyz"
    assert s.upstreams["fw"] == "https://api.fireworks.ai/inference"
    assert s.upstream_prices == {"tgt": "together", "fw": "fireworks", "pp": "perplexity"}
    with pytest.raises(SettingsError, match="prices"):
        load_settings(None, cli={"upstreams": {"x": "https://example.com#prices="}}, env={})
    with pytest.raises(SettingsError, match="url"):
        load_settings(None, cli={"upstreams": {"x": {"prices": "together"}}}, env={})

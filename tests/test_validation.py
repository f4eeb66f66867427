"""Bad configuration and bad API input get clear errors that name what is wrong.

Settings are validated by pydantic at load time (the process never starts on a
bad value); API parameters are validated before any query runs and answered
with one JSON error shape: ``{"error": {"code": "bad_parameter", "param": ..., "message": ...}}``.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from meterproxy.settings import SettingsError, load_settings
from tests.conftest import ProxyFactory


@pytest.mark.parametrize(
    "cli, needle",
    [
        ({"upstreams": {"x": "http://"}}, "not an http(s) URL with a host"),
        ({"upstreams": {"x": "127.0.0.1:8000"}}, "not an http(s) URL"),
        ({"upstreams": {"x": "file:///etc/passwd"}}, "not an http(s) URL"),
        ({"upstreams": {"x": "https://user:pw@api.example.com"}}, "credentials"),
        ({"upstreams": {"x": "https://api.example.com/#frag"}}, "fragment"),
        ({"upstreams": {"a b": "https://api.example.com"}}, "upstream name 'a b'"),
        ({"upstreams": {"../x": "https://api.example.com"}}, "upstream name"),
        ({"durability": "always"}, "durability"),
        ({"request_body_timeout": 0}, "request_body_timeout"),
        ({"read_timeout": -1}, "read_timeout"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"writer_queue_max": 0}, "writer_queue_max"),
        ({"max_draining": -1}, "max_draining"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(cli: dict[str, object], needle: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(None, cli=cli, env={})


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"METERPROXY_UPSTREAMS": "groq"}, "expected NAME=URL"),
        ({"METERPROXY_UPSTREAMS": "groq=ftp://x"}, "not an http(s) URL"),
        ({"METERPROXY_PORT": "eighty"}, "port"),
        ({"METERPROXY_DURABILITY": "paranoid"}, "durability"),
        ({"METERPROXY_READ_TIMEOUT": "soon"}, "read_timeout"),
    ],
)
def test_bad_environment_is_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(None, env=env)


def test_config_file_errors_name_the_file_and_setting(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('durability = "sometimes"\n[upstreams]\nok = "https://api.example.com"\n')
    with pytest.raises(SettingsError, match="durability"):
        load_settings(config, env={})
    config.write_text('[upstreams]\nbad = "gopher://x"\n')
    with pytest.raises(SettingsError, match="gopher"):
        load_settings(config, env={})


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--upstream", "nourl"], "expected NAME=URL"),
        (["--upstream", "x=ftp://h"], "not an http(s) URL"),
        (["--port", "99999"], "port"),
    ],
)
def test_serve_rejects_bad_flags_before_starting(tmp_path: Path, args: list[str], needle: str) -> None:
    from meterproxy.cli import main

    result = CliRunner().invoke(main, ["serve", "--db", str(tmp_path / "x.db"), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    "path, param",
    [
        ("/api/requests?since=yesterday", "since"),
        ("/api/requests?until=2024-13-01", "until"),
        ("/api/requests?limit=0", "limit"),
        ("/api/requests?limit=many", "limit"),
        ("/api/requests?limit=100000", "limit"),
        ("/api/requests?cursor=not-a-cursor", "cursor"),
        ("/api/requests?tag=novalue", "tag"),
        ("/api/summary?group_by=color", "group_by"),
        ("/api/summary?group_by=model&group_by=model", "group_by"),
        ("/api/summary?since=2024-01-02&until=2024-01-01", "until"),
        ("/api/summary?tz=Mars/Olympus", "tz"),
        ("/api/summary?bogus=1", "bogus"),
        ("/api/export?format=xml", "format"),
    ],
)
async def test_bad_api_parameters_are_clear_400s(make_proxy: ProxyFactory, path: str, param: str) -> None:
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}{path}") as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["code"] == "bad_parameter"
    assert error.get("param") == param, error
    assert param in error["message"]

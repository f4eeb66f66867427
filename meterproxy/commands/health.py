"""``meterproxy health``: exit 0 when the local proxy answers ``/healthz``, 1 otherwise.

The container's ``HEALTHCHECK`` runs it. It reads the address from the same
settings ``serve`` reads (config file, ``METERPROXY_*`` environment, flags), so
a container started with ``-e METERPROXY_PORT=9000`` is checked on 9000, not on
a port written into the image. A wildcard bind (``0.0.0.0``, ``::``) is checked
on the loopback address of its family.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

import click

from meterproxy.settings import SettingsError, load_settings

__all__ = ["command", "health_url"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def health_url(host: str, port: int) -> str:
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


@click.command("health")
@click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False), help="TOML config file."
)
@click.option("--port", type=int, default=None, help="Port the proxy listens on [default: from settings].")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for the answer.")
def command(config_file: str | None, port: int | None, timeout: float) -> None:
    """Check that the proxy on this machine answers /healthz (exit 0) or not (exit 1)."""
    try:
        settings = load_settings(config_file, cli={"port": port})
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    url = health_url(settings.host, settings.port)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"{url}: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{url}: {'ok' if ok else 'not ok'}")
    sys.exit(0 if ok else 1)

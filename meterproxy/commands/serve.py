"""``meterproxy serve``: run the proxy.

The flags here are a stable contract (``--host --port --db --upstream --config``);
everything else is in `meterproxy.settings` and may also come from the config
file or ``METERPROXY_*`` environment variables.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import click

from meterproxy.estimate import check_tokenizer_file
from meterproxy.logs import configure_logging
from meterproxy.pricing import PriceBook, PricingError
from meterproxy.routing import parse_upstream
from meterproxy.serving import serving_file
from meterproxy.settings import SettingsError, load_settings, split_upstream_value
from meterproxy.startup import StartupError, bind_listener, check_database
from meterproxy.store.backend import describe as describe_db
from meterproxy.store.backend import require_driver

__all__ = ["command"]

log = logging.getLogger("meterproxy")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8787].")
@click.option(
    "--db",
    default=None,
    envvar="METERPROXY_DB",
    help="SQLite file or postgresql://... URL [default: XDG data dir].",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="NAME=URL",
    help="Add or replace an upstream: /NAME/... is forwarded to URL/... (repeatable).",
)
@click.option(
    "--config", "config_file", default=None, type=click.Path(dir_okay=False), help="TOML config file."
)
@click.option("--pricing", "pricing", multiple=True, help="Extra pricing TOML file (repeatable).")
@click.option("--workers", type=int, default=None, help="Worker processes sharing the port [default: 1].")
@click.option(
    "--allow-public-without-token",
    is_flag=True,
    help="Allow binding a non-loopback address without METERPROXY_ADMIN_TOKEN.",
)
def command(
    host: str | None,
    port: int | None,
    db: str | None,
    upstreams: tuple[str, ...],
    config_file: str | None,
    pricing: tuple[str, ...],
    workers: int | None,
    allow_public_without_token: bool,
) -> None:
    """Run the metering proxy."""
    try:
        parsed = dict(_upstream_flag(spec) for spec in upstreams)
        settings = load_settings(
            config_file,
            cli={
                "host": host,
                "port": port,
                "db": db,
                "upstreams": parsed,
                "pricing": list(pricing) or None,
                "workers": workers,
            },
        )
    except (SettingsError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    configure_logging(settings.log_level)
    require_driver(settings.db)  # before anything starts: say which extra a postgresql:// URL needs
    if settings.pricing:
        # A pricing file that cannot be used stops here with its name, not a traceback at startup.
        try:
            PriceBook.load(overrides=[Path(p) for p in settings.pricing])
        except PricingError as exc:
            raise click.ClickException(f"invalid pricing file: {exc}") from exc
    if not _is_loopback(settings.host) and not settings.admin_token:
        message = (
            f"refusing to listen on {settings.host} without an admin token: /api and the dashboard "
            "would be open to the network. Set METERPROXY_ADMIN_TOKEN, or pass "
            "--allow-public-without-token (e.g. inside a private Docker network)."
        )
        if not allow_public_without_token:
            raise click.UsageError(message)
        log.warning("!!! %s", message.replace("refusing to listen", "listening"))

    if settings.workers > 1 and settings.port == 0:
        raise click.UsageError("--workers needs a fixed --port (each worker binds it)")
    if settings.estimate_usage:
        try:
            check_tokenizer_file(settings.estimate_tokenizer_file)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        check_database(settings.db)
        # With workers, this socket (SO_REUSEPORT) goes to the first of them; the others bind theirs.
        sock = bind_listener(settings.host, settings.port, reuse_port=settings.workers > 1)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.port == 0:
        # The kernel chose the port: the log line, the serving file and the server that binds it
        # again below all name that one (tests start servers this way, free of port races).
        settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    if settings.workers > 1:
        from meterproxy.workers import run_workers

        with serving_file(settings):
            sys.exit(run_workers(settings, settings.workers, sock))

    from meterproxy.runtime import freeze_after_startup, install_uvloop, serve_on, use_metrics_dir

    if settings.metrics_multiproc_dir:  # several single-worker servers sharing one metrics directory
        use_metrics_dir(settings.metrics_multiproc_dir)
    from meterproxy.app import create_app

    install_uvloop()
    app = freeze_after_startup(create_app(settings))
    log.info(
        "meterproxy listening on http://%s:%d (db %s; upstreams: %s)",
        settings.host,
        sock.getsockname()[1],
        describe_db(settings.db),  # a PostgreSQL password never reaches the log
        ", ".join(f"{k}={v}" for k, v in settings.upstreams.items()),
    )
    with serving_file(settings):  # lets `report`, `status` & co. warn when they use another database
        # The socket bound before the app was built, not a new one: connections made
        # while the app was being built wait in its backlog instead of being reset.
        serve_on(app, settings, sock)
    sys.exit(0)


def _upstream_flag(spec: str) -> tuple[str, str]:
    """``NAME=URL[#prices=LIST]`` -> (NAME, value as given), the URL checked here."""
    name, _, value = spec.partition("=")
    url, _prices = split_upstream_value(value)
    upstream = parse_upstream(f"{name}={url}")
    return upstream.name, value.strip()

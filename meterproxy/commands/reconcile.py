"""``meterproxy reconcile openai|anthropic --since DATE``: our records against the provider's bill.

The figures and the verdicts are `meterproxy.reconcile`; this module reads the
admin key from the environment (never from an option, so it stays out of
shell history), turns options into a call and prints the result.
"""

from __future__ import annotations

import os
import urllib.error
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click

from meterproxy.commands.database import resolve_db
from meterproxy.reconcile import (
    PROVIDERS,
    ProviderAnswerError,
    day_range,
    reconcile,
    render_json,
    render_table,
)
from meterproxy.store.backend import parse_db

__all__ = ["command"]


@click.command("reconcile")
@click.argument("provider", type=click.Choice(sorted(PROVIDERS)))
@click.option(
    "--since", required=True, help="First UTC day (YYYY-MM-DD, or an ISO datetime: the UTC day it falls in)."
)
@click.option("--until", default=None, help="Last UTC day, inclusive (as --since) [default: today].")
@click.option("--db", default=None, envvar="METERPROXY_DB", help="Database [default: XDG].")
@click.option("--upstream", default=None, help="Our upstream whose rows to compare [default: PROVIDER].")
@click.option(
    "--base-url", default=None, help="The provider's API base URL [default: the provider's public API]."
)
@click.option("--tolerance", default="0.01", show_default=True, help="Relative difference still matched.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(
    provider: str,
    since: str,
    until: str | None,
    db: str | None,
    upstream: str | None,
    base_url: str | None,
    tolerance: str,
    as_json: bool,
) -> None:
    """Compare recorded usage and cost per day and model with the provider's organisation reports.

    Reads the provider's admin key from OPENAI_ADMIN_KEY or ANTHROPIC_ADMIN_API_KEY.
    """
    api = PROVIDERS[provider]
    key = os.environ.get(api.key_env, "").strip()
    if not key:
        raise click.UsageError(f"set {api.key_env} to an admin key of the {provider} organisation")
    try:
        start, end = day_range(since, until)
        tol = Decimal(tolerance)
    except (ValueError, InvalidOperation) as exc:
        raise click.BadParameter(str(exc)) from exc
    url = base_url or api.base_url
    path = resolve_db(db)
    target = parse_db(path)
    if not target.is_postgres and not Path(target.target).exists():
        raise click.UsageError(f"no database at {path} (pass --db, or set METERPROXY_DB)")
    try:
        result = reconcile(provider, path, key, start, end, upstream=upstream, base_url=url, tolerance=tol)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:500].replace(key, "[REDACTED]")
        hint = (
            f" (is {api.key_env} an admin key of the {provider} organisation?)"
            if exc.code in (401, 403)
            else ""
        )
        raise click.ClickException(f"{url} answered {exc.code}{hint}: {body}") from exc
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:  # a read that timed out, a connection reset mid-answer
        raise click.ClickException(f"reading from {url} failed: {exc}") from exc
    except ProviderAnswerError as exc:
        raise click.ClickException(str(exc).replace(key, "[REDACTED]")) from exc
    click.echo(render_json(result) if as_json else render_table(result))

"""Every setting in one declarative table, with its default, environment variable and help.

`Settings` is that table (a pydantic model: each field's ``description`` is its
help text, and the README's settings section is checked against it by
``tests/test_docs.py``). Values come from, lowest precedence first: the
defaults here, a TOML config file (``--config``), ``METERPROXY_*`` environment
variables, then command-line flags.

Config file example::

    host = "0.0.0.0"
    db = "/data/meterproxy.db"
    [upstreams]
    groq = "https://api.groq.com"
    [upstreams.tgt]                  # an upstream whose name names no price list
    url = "https://api.together.xyz"
    prices = "together"              # ... says which one bills it
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meterproxy.budgets.definition import BudgetSpec, WebhookEndpoint, zone
from meterproxy.routing import Upstream, make_upstream

__all__ = [
    "DEFAULT_UPSTREAMS",
    "Settings",
    "SettingsError",
    "default_db_path",
    "default_prices_dir",
    "load_settings",
    "split_upstream_value",
]

DEFAULT_UPSTREAMS: dict[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


_PRICES_MARK = "#prices="


def split_upstream_value(value: Any) -> tuple[str, str | None]:
    """An upstream's value -> (URL, price list or None).

    ``"https://api.together.xyz"``, ``"https://api.together.xyz#prices=together"``
    (the form ``--upstream`` and ``METERPROXY_UPSTREAMS`` take; a URL never carries
    a fragment) or a config table ``{url = "...", prices = "together"}``.
    """
    if isinstance(value, Mapping):
        unknown = set(value) - {"url", "prices"}
        if unknown or not isinstance(value.get("url"), str):
            raise ValueError(f"an upstream table takes url (required) and prices, got {sorted(value)}")
        prices = value.get("prices")
        if prices is not None and (not isinstance(prices, str) or not prices.strip()):
            raise ValueError("an upstream's prices must be the name of a price list")
        return value["url"], prices.strip().lower() if prices else None
    if not isinstance(value, str):
        raise ValueError(f"an upstream is a URL or a table, got {value!r}")
    url, mark, prices = value.partition(_PRICES_MARK)
    if mark and not prices.strip():
        raise ValueError(f"{value!r}: '#prices=' needs the name of a price list")
    return url.strip(), prices.strip().lower() if mark else None


class SettingsError(ValueError):
    """Configuration that cannot be used; the message says which setting and why."""


def default_prices_dir() -> Path:
    """``$XDG_DATA_HOME/meterproxy/prices``: where ``prices update`` installs newer base prices."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meterproxy" / "prices"


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/meterproxy/meterproxy.db`` (``~/.local/share/...`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meterproxy" / "meterproxy.db"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8787, ge=0, le=65535, description="Port to listen on.")
    db: str = Field(
        default_factory=lambda: str(default_db_path()),
        description="Store: a SQLite file (a path or sqlite:///path; created owner-only), or "
        "postgresql://user@host/db for several replicas sharing one database.",
    )
    replica_poll_interval: float = Field(
        1.0,
        gt=0,
        description="PostgreSQL: seconds between reads of the rows other replicas committed, for budget "
        "spend, alerts and the block gate (bounds how far a block budget can overshoot).",
    )
    upstreams: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_UPSTREAMS),
        description="Route prefix -> upstream base URL; /NAME/... goes to URL/... "
        "(env: METERPROXY_UPSTREAMS='groq=https://api.groq.com,local=http://127.0.0.1:8000').",
    )
    upstream_prices: dict[str, str] = Field(
        default_factory=dict,
        description="Upstream name -> price list that bills it, for upstreams whose name names none "
        "(also [upstreams.NAME] prices = ..., or NAME=URL#prices=LIST in --upstream / "
        "METERPROXY_UPSTREAMS). Without either, an upstream named after no provider prices nothing.",
    )
    aws_sigv4: dict[str, str] = Field(
        default_factory=dict,
        description="Upstream name -> AWS region: requests to that upstream (Amazon Bedrock) are "
        "re-signed with SigV4 using the operator's AWS credentials (standard env/profile chain); the "
        "client's own signature is dropped (env: METERPROXY_AWS_SIGV4='bedrock=us-east-1').",
    )
    admin_token: str | None = Field(
        None, description="When set, /api/* and the dashboard require 'Authorization: Bearer <token>'."
    )
    pricing: list[str] = Field(
        default_factory=list, description="Extra pricing TOML files (private models, negotiated rates)."
    )
    prices_dir: str = Field(
        default_factory=lambda: str(default_prices_dir()),
        description="Directory of base-price updates installed by 'meterproxy prices update'; serve "
        "loads them and picks up new ones while running.",
    )
    prices_reload_interval: float = Field(
        2.0, gt=0, le=3600, description="Seconds between checks of prices_dir for a newly installed update."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest request body accepted; larger ones get a 413."
    )
    max_buffered_body_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Most request-body bytes held in memory at once, all requests together; "
        "a request that does not fit gets a 503 with Retry-After.",
    )
    request_body_timeout: float = Field(
        60.0, gt=0, description="Seconds a client may take to send its whole request body; slower gets a 408."
    )
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to wait for an upstream connection.")
    read_timeout: float = Field(
        600.0, gt=0, description="Seconds an upstream may go silent (between bytes) before a 504."
    )
    inject_stream_usage: bool = Field(
        True,
        description="Add stream_options.include_usage to OpenAI-style streams that lack it "
        "(and strip the extra chunk before the client sees it).",
    )
    disconnect_drain_timeout: float = Field(
        60.0,
        ge=0,
        description="After a client hangs up mid-stream, keep reading upstream this long for the usage.",
    )
    max_draining: int = Field(
        64, ge=0, description="At most this many abandoned streams are drained for usage at once."
    )
    budgets: list[BudgetSpec] = Field(
        default_factory=list,
        description="Spend budgets ([[budgets]] tables in the config file; see 'Budgets and webhooks').",
    )
    budget_timezone: str = Field(
        "UTC", description="IANA timezone of calendar budget periods (day, week, month) by default."
    )
    budget_check_interval: float = Field(
        10.0, gt=0, description="Seconds between budget re-checks (projections, rollovers, table changes)."
    )
    budget_reserve_output_tokens: int = Field(
        32_768,
        gt=0,
        description="Reserve budgets: output tokens reserved for a request that sets no max_tokens, when its "
        "model is not in pricing/limits/output_tokens.toml (whose limits apply otherwise).",
    )
    budget_resync_interval: float = Field(
        60.0,
        gt=0,
        description="Seconds between re-reads of budget spend from the database (other processes).",
    )
    webhooks: dict[str, WebhookEndpoint] = Field(
        default_factory=dict,
        description="Named budget-alert endpoints ([webhooks.NAME] tables: url, secret, format, headers).",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds one webhook delivery attempt may take.")
    webhook_retry_base: float = Field(
        2.0, gt=0, description="Seconds before the first webhook retry; doubles each retry (with jitter)."
    )
    webhook_retry_max: float = Field(1800.0, gt=0, description="Longest wait between two webhook retries.")
    webhook_give_up_after: float = Field(
        86400.0, gt=0, description="Seconds after an event at which undelivered webhooks are marked failed."
    )

    @model_validator(mode="before")
    @classmethod
    def _split_upstream_prices(cls, data: Any) -> Any:
        """Upstream values may carry their price list; move it to ``upstream_prices``."""
        if not isinstance(data, dict) or not isinstance(data.get("upstreams"), Mapping):
            return data
        urls: dict[str, Any] = {}
        prices = dict(data.get("upstream_prices") or {})
        for name, value in data["upstreams"].items():
            url, plist = split_upstream_value(value)
            urls[name] = url
            if plist is not None:
                prices[name] = plist
        return {**data, "upstreams": urls, "upstream_prices": prices}

    @field_validator("budget_timezone")
    @classmethod
    def _check_budget_timezone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("budgets")
    @classmethod
    def _check_budget_names(cls, value: list[BudgetSpec]) -> list[BudgetSpec]:
        names = [b.name for b in value]
        if len(set(names)) != len(names):
            raise ValueError("two budgets have the same name")
        return value

    writer_queue_max: int = Field(
        100_000, gt=0, description="Records buffered in memory while the database is slow or failing."
    )
    durability: Literal["batch", "strict"] = Field(
        "batch",
        description="batch: records are committed within milliseconds of the answer (a crash can lose "
        "the last moment's); strict: an answer's last byte waits for its record's commit.",
    )
    http_server: Literal["lean", "aiohttp"] = Field(
        "lean",
        description="lean: the proxy routes are served by meterproxy's own llhttp protocol and every "
        "other path by the aiohttp application on the same port; aiohttp: aiohttp serves everything "
        "(slower, the fallback).",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds in-flight requests get to finish."
    )
    store_content: bool = Field(
        False,
        description="Store each request's body and its answer's text (off: only counts and metadata "
        "are stored). Credentials and content_redact_patterns are redacted; never exported.",
    )
    content_max_bytes: int = Field(
        65536, gt=0, description="With store_content: bytes kept of each request body and of each answer."
    )
    content_redact_patterns: list[str] = Field(
        default_factory=list,
        description="With store_content: regular expressions whose matches are replaced by [REDACTED] "
        "before storing (e.g. emails, card numbers).",
    )
    estimate_usage: bool = Field(
        False,
        description="Count the tokens of answers that report no usage (a stream without include_usage, "
        "an answer cut off) and price them as estimates: labelled cost_source estimated, shown apart, "
        "never part of spend. The texts are counted in memory, never stored.",
    )
    estimate_tokenizer_file: str | None = Field(
        None,
        description="With estimate_usage: a local tiktoken encoding file (o200k_base.tiktoken or "
        "cl100k_base.tiktoken, optionally gzipped; needs meterproxy[estimate]). Without it: 1 token per "
        "4 bytes of UTF-8 text, labelled heuristic.",
    )
    estimate_max_bytes: int = Field(
        1_048_576,
        gt=0,
        description="With estimate_usage: bytes of each answer held in memory while it streams, to "
        "count if it ends without usage (a longer answer is counted up to there, and says so).",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    access_log: bool = Field(
        False,
        description="Log one line per request at info: status, upstream, model, tokens, cost, duration "
        "and request id (never keys, users, tags or content).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Worker processes sharing the port (SO_REUSEPORT); each has its own event loop "
        "and store writer. Use about one per core.",
    )
    retention_days: int = Field(
        180,
        ge=0,
        description="Raw request rows older than this many days are deleted once rolled up into "
        "the hourly/daily rollups (totals never change); 0 keeps them forever.",
    )
    rollup_interval: float = Field(
        5.0, gt=0, le=3600, description="Seconds between background rollup and retention passes."
    )
    metrics_require_token: bool = Field(
        False, description="Put GET /metrics behind the admin token too (off: scrapers need no token)."
    )
    metrics_max_unknown_models: int = Field(
        20,
        ge=0,
        description="Models outside the price table kept as their own metrics label; later ones "
        "are labelled 'other'.",
    )
    metrics_tag_labels: list[str] = Field(
        default_factory=list,
        description="Tag keys (X-Meter-Tags) to add as tag_<key> labels on request, token and cost "
        "metrics (env: comma-separated).",
    )
    metrics_max_tag_values: int = Field(
        20, ge=0, description="Distinct values per tag label before later ones are labelled 'other'."
    )
    metrics_multiproc_dir: str | None = Field(
        None,
        description="Directory for per-process metric files when running several worker processes "
        "(same as PROMETHEUS_MULTIPROC_DIR; empty it when the server starts).",
    )

    @field_validator("db")
    @classmethod
    def _check_db(cls, value: str) -> str:
        from meterproxy.store.backend import parse_db

        parse_db(value)  # a path, sqlite:///path or postgresql://...
        return value

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            make_upstream(name, url)
        return value

    @model_validator(mode="after")
    def _check_aws_sigv4(self) -> Settings:
        for name, region in self.aws_sigv4.items():
            if name not in self.upstreams:
                raise ValueError(f"aws_sigv4: {name!r} is not a configured upstream")
            if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", region):
                raise ValueError(f"aws_sigv4: {region!r} is not an AWS region (e.g. us-east-1)")
        return self

    @field_validator("content_redact_patterns")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from exc
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("use debug, info, warning or error")
        return value.lower()

    @field_validator("metrics_tag_labels", mode="before")
    @classmethod
    def _split_tag_labels(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def upstream_map(self) -> dict[str, Upstream]:
        return {name: make_upstream(name, url) for name, url in self.upstreams.items()}


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, _field in Settings.model_fields.items():
        raw = env.get(f"METERPROXY_{name.upper()}")
        if raw is None:
            continue
        if name in ("upstreams", "upstream_prices", "aws_sigv4"):
            values[name] = dict(_split_pair(item) for item in raw.split(",") if item.strip())
        elif name == "pricing":
            values[name] = [p for p in raw.split(os.pathsep) if p]
        elif name == "content_redact_patterns":  # one pattern per line (commas occur in regexes)
            values[name] = [p for p in raw.splitlines() if p]
        else:
            values[name] = raw
    return values


def _split_pair(item: str) -> tuple[str, str]:
    name, sep, url = item.partition("=")
    if not sep:
        raise SettingsError(f"upstream {item!r}: expected NAME=URL")
    return name.strip(), url.strip()


def load_settings(
    config_file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults < config file < environment < CLI, and validate."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    config_file = config_file or env.get("METERPROXY_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                merged.update(tomllib.load(fh))
        except OSError as exc:
            raise SettingsError(f"config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from exc
    upstreams = {**DEFAULT_UPSTREAMS, **merged.pop("upstreams", {})}
    env_values = _env_values(env)
    upstreams.update(env_values.pop("upstreams", {}))
    merged.update(env_values)
    # METERPROXY_DB is the documented short form for the database path.
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key == "upstreams":
            upstreams.update(value)
        else:
            merged[key] = value
    merged["upstreams"] = upstreams
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc

"""What a budget is, and the calendar arithmetic of its periods (pure: no I/O, no clock).

A `BudgetSpec` is the declarative definition, the same whether it comes from the
config file (``[[budgets]]``) or from ``POST /api/budgets``:

- ``scope``: which requests count. Empty means every request; each field that is
  set narrows it (all of them must match): ``upstream`` (route prefix),
  ``provider``, ``model`` (the answered or the requested model id), ``user``,
  ``key`` (the API key fingerprint shown in ``/api/requests``) and ``tags``
  (every ``key: value`` pair must be on the request).
- ``period``: ``day``, ``week`` (ISO, from Monday) or ``month`` in the budget's
  ``timezone`` (default: the ``budget_timezone`` setting), or
  ``rolling:<duration>`` such as ``rolling:24h``, ``rolling:30m``,
  ``rolling:7d`` (the last N, sliding with the clock).
- ``limit_usd`` (exact Decimal), ``thresholds`` in percent of the limit (default
  50, 80, 100) and ``action`` at the limit: ``alert``, ``block`` or ``reserve``;
  ``unpriced`` (with ``unpriced_reserve_usd``) says what a ``reserve`` budget does
  with a request it cannot price (`meterproxy.budgets.reserve`).
- ``projected``: also alert when the projected spend at the current burn rate
  exceeds the limit before the period ends (calendar periods only).

`WebhookEndpoint` is where alerts go. Endpoints are named in the config file;
a budget lists the names it alerts (default: all of them).

Periods are computed here from an explicit ``now`` so that spend, alerts and
tests agree on one definition; nothing in this module reads the clock.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meterproxy.pricing_names import canonical

__all__ = [
    "BudgetScope",
    "BudgetSpec",
    "Period",
    "WebhookEndpoint",
    "parse_duration",
    "period_bounds",
    "zone",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def signing_key(secret: str) -> bytes:
    """A webhook secret's HMAC key, decoded exactly as the Standard Webhooks reference library does.

    A secret is base64, with or without the ``whsec_`` prefix; the reference
    verifier (``standardwebhooks.Webhook``) base64-decodes whatever follows the
    prefix, so a receiver using it verifies our signatures only if we key the
    HMAC with the same bytes. A secret outside the base64 alphabet is refused
    (the library would silently drop those characters).
    """
    text = secret.removeprefix("whsec_")
    if not _BASE64.fullmatch(text):
        raise ValueError(
            "a webhook secret is base64 (Standard Webhooks), optionally prefixed 'whsec_'; "
            'generate one with: python3 -c "import base64,secrets;'
            "print('whsec_'+base64.b64encode(secrets.token_bytes(32)).decode())\""
        )
    try:
        key = base64.b64decode(text + "==")  # the library pads the same way
    except binascii.Error as exc:
        raise ValueError(f"a webhook secret is base64: {exc}") from exc
    if not key:
        raise ValueError("a webhook secret may not decode to nothing")
    return key


_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"1h30m"``, ``"7d"``, ``"2w"`` -> timedelta (ValueError otherwise)."""
    compact = text.replace(" ", "").lower()
    if not compact or _DURATION.sub("", compact):
        raise ValueError(f"{text!r} is not a duration like 30m, 24h or 7d")
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(compact))
    if seconds <= 0:
        raise ValueError(f"{text!r}: a rolling window must be longer than zero")
    return timedelta(seconds=seconds)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r} (use an IANA name such as Europe/Paris)") from exc


class BudgetScope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstream: str | None = Field(None, description="Route prefix, e.g. openai or groq.")
    provider: str | None = Field(None, description="openai, anthropic or gemini (google is an alias).")
    model: str | None = Field(None, description="Answered or requested model id.")
    user: str | None = Field(None, description="X-Meter-User (or the body's user field).")
    key: str | None = Field(None, description="API key fingerprint (as in /api/requests).")
    tags: dict[str, str] = Field(default_factory=dict, description="Every pair must be on the request.")

    @field_validator("provider")
    @classmethod
    def _one_vocabulary(cls, value: str | None) -> str | None:
        """Rows say ``gemini``; a budget written with ``google`` (or ``x-ai``) means the same."""
        return canonical(value) if value is not None else None

    def is_global(self) -> bool:
        return not (self.upstream or self.provider or self.model or self.user or self.key or self.tags)

    def describe(self) -> dict[str, Any]:
        """The scope as JSON, without unset fields (``{}`` for a global budget)."""
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique name; appears in 429 messages, events and metrics.")
    scope: BudgetScope = Field(default_factory=lambda: BudgetScope.model_validate({}))
    period: str = Field("month", description="day, week, month or rolling:<duration>.")
    timezone: str | None = Field(None, description="IANA zone for calendar periods (default: setting).")
    limit_usd: Decimal = Field(gt=0, description="The limit in USD (exact).")
    thresholds: list[Decimal] = Field(
        default_factory=lambda: [Decimal(50), Decimal(80), Decimal(100)],
        description="Alert thresholds in percent of the limit.",
    )
    action: Literal["alert", "block", "reserve"] = Field(
        "alert",
        description="At the limit: alert; block (spend recorded so far); or reserve (admit a request only "
        "if its worst-case cost fits, so requests in flight can never pass the limit).",
    )
    unpriced: Literal["refuse", "reserve", "allow"] | None = Field(
        None,
        description="reserve budgets, for a request whose worst case has no price (its model is not in "
        "the tables, or it names none): refuse it (the default: a hard limit cannot bound it); reserve "
        "unpriced_reserve_usd for it; or allow it holding nothing (the limit can then be passed by what "
        "such requests cost).",
    )
    unpriced_reserve_usd: Decimal | None = Field(
        None, gt=0, description="With unpriced = 'reserve': the USD held for each unpriced request."
    )
    projected: bool = Field(False, description="Alert when the projected spend exceeds the limit.")
    notify_reset: bool = Field(False, description="Send budget.reset when a new calendar period starts.")
    webhooks: list[str] | None = Field(None, description="Endpoint names to alert (default: all).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("period")
    @classmethod
    def _check_period(cls, value: str) -> str:
        Period.parse(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            zone(value)
        return value

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: list[Decimal]) -> list[Decimal]:
        if any(t <= 0 or t > 1000 for t in value):
            raise ValueError("thresholds are percentages between 0 (exclusive) and 1000")
        return sorted(set(value))

    @model_validator(mode="after")
    def _check_reserve(self) -> BudgetSpec:
        if self.action == "reserve" and Period.parse(self.period).rolling:
            raise ValueError(
                "action 'reserve' needs a calendar period (day, week or month), not a rolling one"
            )
        if self.unpriced is not None and self.action != "reserve":
            raise ValueError("'unpriced' applies to action 'reserve' only")
        if (self.unpriced == "reserve") != (self.unpriced_reserve_usd is not None):
            raise ValueError("unpriced = 'reserve' and unpriced_reserve_usd go together")
        return self

    @property
    def unpriced_policy(self) -> Literal["refuse", "reserve", "allow"]:
        """What a reserve budget does with a request it cannot price (default: refuse)."""
        return self.unpriced or "refuse"


@dataclass(frozen=True, slots=True)
class Period:
    """A parsed ``period``: a calendar unit, or a rolling window of ``window``."""

    unit: Literal["day", "week", "month", "rolling"]
    window: timedelta | None = None

    @classmethod
    def parse(cls, text: str) -> Period:
        if text in ("day", "week", "month"):
            return cls(text)  # type: ignore[arg-type]
        kind, sep, rest = text.partition(":")
        if kind == "rolling" and sep:
            return cls("rolling", parse_duration(rest))
        raise ValueError(f"{text!r}: use day, week, month or rolling:<duration> (e.g. rolling:24h)")

    @property
    def rolling(self) -> bool:
        return self.unit == "rolling"


def period_bounds(period: Period, tz: ZoneInfo, now: datetime) -> tuple[datetime, datetime]:
    """The period containing ``now`` as UTC ``[start, end)``; a rolling window ends at ``now``."""
    if period.window is not None:
        return now - period.window, now
    local = now.astimezone(tz)
    if period.unit == "day":
        first = local.date()
        nxt = first + timedelta(days=1)
    elif period.unit == "week":
        first = local.date() - timedelta(days=local.weekday())
        nxt = first + timedelta(days=7)
    else:
        first = local.date().replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
    start = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).astimezone(UTC)
    return start, end


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Where events are POSTed (http or https).")
    secret: str | None = Field(
        None,
        description="Signing secret: base64, optionally prefixed 'whsec_' (Standard Webhooks); "
        "unsigned when empty.",
    )
    format: Literal["standard", "slack"] = Field(
        "standard", description="'slack' adds a 'text' field so a Slack incoming webhook can post it."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("webhook url must start with http:// or https://")
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        if value:
            signing_key(value)
        return value

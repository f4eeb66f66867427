"""The budget gate: a request in scope of a spent ``block`` budget gets a 429, not an upstream.

This fires at the proxy's **gated** stage (`Meter.check_gates`): the request
has been read and attributed (upstream, provider, requested model, user, key
fingerprint, tags) but nothing has been sent upstream yet, so blocking costs
nothing. The answer is a 429 in the provider's own error shape so each
official SDK raises its usual rate-limit error (``openai.RateLimitError``,
``anthropic.RateLimitError``, google-genai ``ClientError`` with code 429),
with a message naming the budget. ``x-should-retry: false`` tells the OpenAI and
Anthropic SDKs not to retry; ``retry-after`` says when a calendar period ends.

Overshoot bound: spend is known once a request has finished and been priced,
so requests already in flight when the limit is reached still complete. A
budget can therefore end above its limit by at most the cost of the requests
that were in flight at that moment (plus, for a freshly created budget, none).
Blocked requests are recorded like the proxy's other refusals (413, 408):
status 429, ``error`` naming the budget, no usage and no cost (they never
reached a provider), so ``/api/requests?...`` shows who was stopped and when.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from meterproxy.budgets.spend import BudgetState, Snapshot, SpendTracker
from meterproxy.meter import Gate
from meterproxy.usage import RequestRecord

__all__ = ["blocked_response", "make_gate"]


def _message(state: BudgetState, snap: Snapshot) -> str:
    until = "" if state.period.rolling else f" until {snap.period_end.isoformat()}"
    return (
        f"meterproxy: budget '{state.spec.name}' is spent "
        f"(${snap.spend_usd} of ${snap.limit_usd} this {state.spec.period}); "
        f"requests in its scope are blocked{until}"
    )


def blocked_response(provider: str, state: BudgetState, snap: Snapshot, now: datetime) -> web.Response:
    message = _message(state, snap)
    body: dict[str, object]
    if provider == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
    elif provider == "gemini":
        body = {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}
    else:  # OpenAI and every OpenAI-compatible upstream
        body = {
            "error": {
                "message": message,
                "type": "budget_exceeded",
                "param": None,
                "code": "budget_exceeded",
            }
        }
    headers = {"x-should-retry": "false", "x-meterproxy-budget": state.spec.name}
    if state.period.rolling:
        # The spend leaves a rolling window as it ages; a minute is a fair hint.
        headers["retry-after"] = "60"
    else:
        headers["retry-after"] = str(max(1, math.ceil((snap.period_end - now).total_seconds())))
    return web.Response(status=429, text=json.dumps(body), content_type="application/json", headers=headers)


def make_gate(
    tracker: SpendTracker, clock: Callable[[], datetime], finished: Callable[[RequestRecord], None]
) -> Gate:
    """The gate; ``finished`` records a blocked request (status 429, no usage, no cost)."""

    async def budget_gate(record: RequestRecord) -> web.StreamResponse | None:
        now = clock()
        found = tracker.blocking(record, now)
        if found is None:
            return None
        state, snap = found
        record.status = 429
        record.usage_source = "none"
        record.error = f"blocked by budget '{state.spec.name}'"
        record.extra["budget"] = state.spec.name
        finished(record)
        return blocked_response(record.provider, state, snap, now)

    return budget_gate

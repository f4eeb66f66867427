"""The budget gate: a request in scope of a spent ``block`` budget gets a 429, not an upstream.

This fires at the proxy's **gated** stage (`Meter.check_gates`): the request
has been read and attributed (upstream, provider, requested model, user, key
fingerprint, tags) but nothing has been sent upstream yet, so blocking costs
nothing. The answer is a 429 in the provider's own error shape, chosen so that
each official SDK and each coding agent stops at once and shows the message
naming the budget (``tests/test_budgets.py``, ``tests/test_agents.py``):

- OpenAI and every OpenAI-compatible route: ``insufficient_quota``, OpenAI's
  own "you are out of credit" error, the one shape clients treat as final:
  Codex CLI prints "Quota exceeded" and exits instead of retrying; the openai
  SDK raises ``RateLimitError`` (code ``insufficient_quota``) without retrying.
- Anthropic: ``rate_limit_error``; the anthropic SDK raises ``RateLimitError``
  and Claude Code prints "API Error: Request rejected (429) · <message>" and exits.
- Gemini: ``RESOURCE_EXHAUSTED``.

``x-should-retry: false`` is what the openai and anthropic SDKs (``max_retries``
or not) and Claude Code obey: they make no second attempt. No ``retry-after``
is sent: a client that honours it would sleep until the period ends (weeks for
a monthly budget) and show nothing meanwhile. When the budget frees up is in
``x-meterproxy-budget-resets`` (ISO 8601; absent for a rolling window).

``action = "reserve"`` budgets admit a request only if its worst case fits
(`meterproxy.budgets.reserve`); a refusal has the same shape, with a message
naming the spend, the holds and the request's worst case.

Overshoot bound (``block``): spend is known once a request has finished and been priced,
so requests already in flight when the limit is reached still complete. A
budget can therefore end above its limit by at most the cost of the requests
that were in flight at that moment (plus, for a freshly created budget, none).
Blocked requests are recorded like the proxy's other refusals (413, 408):
status 429, ``error`` naming the budget, no usage and no cost (they never
reached a provider), so ``/api/requests?...`` shows who was stopped and when.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from meterproxy.budgets.reserve import ReservationLedger, reserve_budgets
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


def blocked_response(
    provider: str, state: BudgetState, snap: Snapshot, message: str | None = None
) -> web.Response:
    message = message or _message(state, snap)
    body: dict[str, object]
    if provider == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
    elif provider == "gemini":
        body = {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}
    elif provider == "bedrock":
        # AWS's JSON error: the type in x-amzn-ErrorType (botocore's error code), the text in
        # "message". Bedrock's own quota error, with its status (400): boto3 retries every 429
        # (4 more attempts by default, each one refused and recorded again).
        body = {"message": message}
    else:  # OpenAI and every OpenAI-compatible upstream
        body = {
            "error": {
                "message": message,
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
    headers = {"x-should-retry": "false", "x-meterproxy-budget": state.spec.name}
    if provider == "bedrock":
        headers["x-amzn-errortype"] = "ServiceQuotaExceededException"
    if not state.period.rolling:
        headers["x-meterproxy-budget-resets"] = snap.period_end.isoformat()
    status = 400 if provider == "bedrock" else 429
    text = json.dumps(body)
    return web.Response(status=status, text=text, content_type="application/json", headers=headers)


def make_gate(
    tracker: SpendTracker,
    clock: Callable[[], datetime],
    finished: Callable[[RequestRecord], None],
    ledger: ReservationLedger | None = None,
) -> Gate:
    """The gate; ``finished`` records a blocked request (status 429, no usage, no cost).

    ``block`` budgets are checked first (in memory); then, if any ``reserve`` budget
    covers the request, the `ReservationLedger` admits it or says which budget cannot.
    """

    def refuse(
        record: RequestRecord, state: BudgetState, snap: Snapshot, message: str | None
    ) -> web.Response:
        record.status = 429
        record.usage_source = "none"
        record.error = f"blocked by budget '{state.spec.name}'"
        record.extra["budget"] = state.spec.name
        finished(record)
        return blocked_response(record.provider, state, snap, message)

    async def budget_gate(record: RequestRecord) -> web.StreamResponse | None:
        if tracker.empty:
            return None  # neither a block nor a reserve budget to consult
        now = clock()
        found = tracker.blocking(record, now)
        if found is not None:
            return refuse(record, found[0], found[1], None)
        if ledger is None:
            return None
        reserving = reserve_budgets(tracker.states(), record)
        if not reserving:
            return None
        refusal = await ledger.admit(record, reserving)
        if refusal is None:
            return None
        now = clock()
        snap = tracker.snapshot(refusal.state.spec.name, now) or refusal.state.snapshot(now)
        return refuse(record, refusal.state, snap, refusal.message())

    return budget_gate

"""``GET /api/me/usage``: a key holder's own spend, without the admin token.

Who asks is whoever holds an API key the proxy has seen: the caller sends the
same credential it sends to the provider (``Authorization: Bearer``,
``x-api-key``, ``x-goog-api-key``, ``api-key``), the handler fingerprints it
exactly as the proxy does (HMAC with this database's salt) and answers only
rows with that fingerprint. The key itself is never stored, logged or echoed;
a key the proxy never saw answers zeros, which tells nothing about anyone
else. The ``key`` and ``user``/``session`` filters of the admin API are not
accepted here: the fingerprint is the only scope.

Query: ``since``/``until`` (default: the current UTC calendar month up to now)
and ``group_by`` (one of ``model, provider, day, month, session``; default
``model``). The numbers come from the same `summarize` as ``/api/summary``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from meterproxy.api import ParamError, api_error, json_response, parse_time
from meterproxy.api.models import measures_to_api
from meterproxy.app_state import FINGERPRINT_SALT, READERS
from meterproxy.attribution import api_key, fingerprint, is_sigv4
from meterproxy.store.queries import RequestFilter, run_read
from meterproxy.store.summary import SummaryQuery, summarize

__all__ = ["ME_PREFIX", "setup"]

#: Paths under this prefix authenticate by the provider key, not the admin token.
ME_PREFIX = "/api/me/"

_GROUPS = ("model", "provider", "day", "month", "session")
_PARAMS = ("since", "until", "group_by")


async def my_usage_handler(request: web.Request) -> web.Response:
    query = request.query
    try:
        for name in query:
            if name == "key":
                # The admin API's key filter (a fingerprint), or a Gemini-style ?key=: neither is
                # taken here. A key in a URL ends up in logs; the fingerprint is the only scope.
                raise ParamError(
                    name,
                    "not accepted here: send your API key in a header (Authorization: Bearer, "
                    "x-api-key, x-goog-api-key or api-key); your own usage is the only scope",
                )
            if name not in _PARAMS:
                raise ParamError(name, f"unknown parameter (accepted: {', '.join(_PARAMS)})")
        now = datetime.now(UTC)
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        since = parse_time("since", query.get("since")) or parse_time("since", month_start.isoformat())
        assert since is not None
        until = parse_time("until", query.get("until"))
        if until is not None and since >= until:
            raise ParamError("until", "must be later than since")
        group = query.get("group_by", "model")
        if group not in _GROUPS:
            raise ParamError("group_by", f"{group!r}: use one of {', '.join(_GROUPS)}")
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    if is_sigv4(request.headers):
        # A SigV4 header names an access key id, which is no secret, and meterproxy never
        # holds the secret key that would check its signature: it proves nothing here.
        return api_error(
            401,
            "unauthorized",
            "an AWS SigV4 signature cannot be checked here (meterproxy never holds the secret key); "
            "ask the operator for your Bedrock usage",
        )
    key = api_key(request.headers)
    if not key:
        return api_error(
            401,
            "unauthorized",
            "send the API key you use with the provider (Authorization: Bearer, x-api-key, "
            "x-goog-api-key or api-key) to see its usage",
        )

    fp = fingerprint(key, request.app[FINGERPRINT_SALT])
    q = SummaryQuery(RequestFilter(since=since, until=until, key=fp), [group])
    summary = await run_read(request.app[READERS], lambda conn: summarize(conn, q))
    groups: list[dict[str, Any]] = [{"key": k, **measures_to_api(m)} for k, m in summary.groups]
    return json_response(
        {
            "key_fingerprint": fp,
            "since": since,
            "until": until,
            "group_by": [group],
            "totals": measures_to_api(summary.totals),
            "groups": groups,
        }
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/me/usage", my_usage_handler)

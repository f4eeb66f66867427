"""``GET /api/whatif``: the selected traffic priced as another model (the page's and scripts' what-if).

Query: ``as_model`` (required), ``as_provider`` (the price list to read it from;
default: every list, as the operator asked for this model by name), ``prices``
(``dated``: each request at its own date, the default; ``today``), and the
filters of ``/api/requests`` (``since, until, model, provider, upstream, user,
session, key, source, tag``). The answer is `meterproxy.whatif.WhatIf.as_dict`,
the same figures as ``meterproxy report --as-model --json``, with exact decimal
costs. It reads raw rows (see `meterproxy.whatif`), on a worker thread.
"""

from __future__ import annotations

from aiohttp import web

from meterproxy.api import ParamError, api_error, json_response
from meterproxy.api.openapi import document
from meterproxy.api.summary import FILTER_PARAMS, check_known, parse_filter
from meterproxy.app_state import PRICEBOOK, READERS
from meterproxy.store.queries import run_read
from meterproxy.whatif import PriceMoment, what_if

__all__ = ["setup"]

_PARAMS = (*FILTER_PARAMS, "as_model", "as_provider", "prices")


async def whatif_handler(request: web.Request) -> web.Response:
    query = request.query
    book = request.app[PRICEBOOK]
    try:
        check_known(query, _PARAMS)
        flt = parse_filter(query)
        target = (query.get("as_model") or "").strip()
        if not target:
            raise ParamError("as_model", "name the model to price this traffic as")
        provider = (query.get("as_provider") or "").strip() or None
        if book.resolve(target, provider) is None:
            where = f" in the {provider} price list" if provider else ""
            raise ParamError("as_model", f"{target!r} has no price{where}")
        prices = query.get("prices", "dated")
        if prices not in ("dated", "today"):
            raise ParamError("prices", "use dated or today")
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    moment: PriceMoment = "today" if prices == "today" else "dated"
    result = await run_read(
        request.app[READERS],
        lambda conn: what_if(conn, flt, book, target, target_provider=provider, prices=moment),
    )
    return json_response(result.as_dict())


def setup(app: web.Application) -> None:
    app.router.add_get("/api/whatif", whatif_handler)
    document(
        app,
        "/api/whatif",
        "get",
        {
            "summary": "The selected traffic priced as another model (as_model), with the difference and "
            "what caching saved.",
            "parameters": [
                {"name": "as_model", "in": "query", "required": True, "schema": {"type": "string"}},
                {"name": "as_provider", "in": "query", "required": False, "schema": {"type": "string"}},
                {
                    "name": "prices",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["dated", "today"]},
                },
                "since",
                "until",
                "model",
                "provider",
                "upstream",
                "user",
                "session",
                "key",
                "source",
            ],
            "response": {"application/json": {"schema": {"type": "object"}}},
        },
    )

"""``GET /api/openapi.json``: the OpenAPI 3.1 document of the JSON API.

Schemas come from pydantic models (``api/models.py``, and request bodies' own
models such as `BudgetSpec`); the paths are tables naming for each route its
parameters (from the shared `PARAMETERS` table), its request body and its
response model. This package's routes are `CORE_PATHS`, a constant; features
outside it (budgets, webhooks) add theirs to *their application* with
`document(app, ...)` from their own ``setup``: nothing is kept in a module
global, and two apps in one process never share an entry. A test checks that
every ``/api`` route an application registers is in its document, so a new
endpoint is not finished until it is documented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from meterproxy import __version__
from meterproxy.api import json_response
from meterproxy.api.models import (
    ErrorResponse,
    RequestContent,
    RequestsResponse,
    SessionDetail,
    SessionsResponse,
    SummaryResponse,
    TimeseriesResponse,
    UnpricedModelsResponse,
)
from meterproxy.app_state import API_DOCS

__all__ = ["CORE_PATHS", "PARAMETERS", "Operations", "build_spec", "document", "setup"]

#: path -> method -> {"summary", "parameters", "path_parameters", "body", "response"}
Operations = dict[str, dict[str, dict[str, Any]]]


def _q(description: str, schema: dict[str, Any] | None = None, required: bool = False) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}, "required": required}


_INT = {"type": "integer"}
PARAMETERS: dict[str, dict[str, Any]] = {
    "since": _q("Start (inclusive), ISO 8601; UTC unless an offset is given."),
    "until": _q("End (exclusive), ISO 8601; UTC unless an offset is given."),
    "session": _q("Only this session (X-Meter-Session)."),
    "user": _q("Only this user."),
    "model": _q("Only this model (as answered)."),
    "provider": _q("Only this provider (openai, anthropic, gemini, ...)."),
    "upstream": _q("Only this upstream (route prefix)."),
    "key": _q("Only this API key fingerprint."),
    "source": _q("Only this source (proxy, or an importer)."),
    "tag": _q("KEY:VALUE; repeatable; all must match.", {"type": "array", "items": {"type": "string"}}),
    "group_by": _q(
        "One or two of model, provider, upstream, user, session, key, source, tag:<name>, "
        "hour, day, week, month (comma-separated)."
    ),
    "tz": _q("IANA time zone for calendar buckets (default UTC)."),
    "limit": _q("Most items returned.", _INT),
    "cursor": _q("next_cursor of the previous page."),
    "offset": _q("Items to skip (next_offset of the previous page).", _INT),
    "bucket": _q("hour, day, week or month.", {"enum": ["hour", "day", "week", "month"]}, required=True),
    "split": _q("One non-time dimension: one series per value."),
    "sort": _q(
        "last_seen, first_seen, cost, requests or tokens.",
        {"enum": ["last_seen", "first_seen", "cost", "requests", "tokens"]},
    ),
    "request_sort": {
        "name": "sort",
        **_q("time (default), cost, tokens or latency.", {"enum": ["time", "cost", "tokens", "latency"]}),
    },
    "order": _q("asc or desc.", {"enum": ["asc", "desc"]}),
    "format": _q("csv or jsonl.", {"enum": ["csv", "jsonl"]}),
}

_FILTERS = ["since", "until", "session", "user", "model", "provider", "upstream", "key", "source", "tag"]

#: This package's own routes (see `Operations`); never changed at run time.
CORE_PATHS: Final[Operations] = {
    "/api/requests": {
        "get": {
            "summary": "Stored requests, newest first (keyset pages) or sorted by cost, tokens or latency.",
            "parameters": ["limit", "cursor", "request_sort", "order", "offset", *_FILTERS],
            "response": RequestsResponse,
        }
    },
    "/api/requests/{id}/content": {
        "get": {
            "summary": "A request's stored text (store_content only; redacted; 404 when none).",
            "parameters": [],
            "path_parameters": ["id"],
            "response": RequestContent,
        }
    },
    "/api/summary": {
        "get": {
            "summary": "Totals and groups over a time range (rollups + raw rows, exact costs).",
            "parameters": ["group_by", "tz", "limit", *_FILTERS],
            "response": SummaryResponse,
        }
    },
    "/api/models/unpriced": {
        "get": {
            "summary": "Models whose requests could not be priced (not in the price tables), paged.",
            "parameters": ["limit", "offset", *_FILTERS],
            "response": UnpricedModelsResponse,
        }
    },
    "/api/timeseries": {
        "get": {
            "summary": "Totals per hour/day/week/month bucket, every bucket present, optionally split.",
            "parameters": ["bucket", "split", "tz", "limit", *_FILTERS],
            "response": TimeseriesResponse,
        }
    },
    "/api/sessions": {
        "get": {
            "summary": "Sessions with their totals, sortable, offset-paginated.",
            "parameters": ["sort", "order", "limit", "offset", *_FILTERS],
            "response": SessionsResponse,
        }
    },
    "/api/sessions/{id}": {
        "get": {
            "summary": "One session's totals and its requests (newest first, paginated).",
            "parameters": ["since", "until", "limit", "offset", "cursor"],
            "path_parameters": ["id"],
            "response": SessionDetail,
        }
    },
    "/api/export": {
        "get": {
            "summary": "Every matching request row, streamed, oldest first (CSV with header, or JSONL).",
            "parameters": ["format", *_FILTERS],
            "response": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "summary": "This document.",
            "parameters": [],
            "response": {"application/json": {"schema": {"type": "object"}}},
        }
    },
}


_ANY_JSON = {"application/json": {"schema": {"type": "object"}}}
CORE_PATHS["/api/me/usage"] = {
    "get": {
        "summary": "The calling API key's own usage (authenticated by that provider key, "
        "not the admin token).",
        "parameters": ["since", "until", "group_by"],
        "response": _ANY_JSON,
    }
}


def document(app: web.Application, path: str, method: str, operation: dict[str, Any]) -> None:
    """Add a route of ``app`` (``operation`` as in `Operations`; parameters may be dicts) to its document."""
    if API_DOCS not in app:
        app[API_DOCS] = {}
    app[API_DOCS].setdefault(path, {})[method.lower()] = operation


def _parameter(name: str | dict[str, Any], where: str = "query") -> dict[str, Any]:
    if isinstance(name, dict):
        return name
    if where == "path":
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    spec = PARAMETERS.get(name, _q(name))
    out = {"name": name, "in": "query", **spec}
    if spec["schema"].get("type") == "array":
        out.update(style="form", explode=True)
    return out


def build_spec(documented: Mapping[str, Mapping[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The OpenAPI document of `CORE_PATHS` plus an app's `document`-ed routes (``app[API_DOCS]``)."""
    all_paths: dict[str, dict[str, dict[str, Any]]] = {p: dict(ops) for p, ops in CORE_PATHS.items()}
    for path, ops in (documented or {}).items():
        all_paths.setdefault(path, {}).update(ops)
    models: list[type[BaseModel]] = [ErrorResponse]
    for ops in all_paths.values():
        models += [op["response"] for op in ops.values() if isinstance(op["response"], type)]
        models += [op["body"] for op in ops.values() if isinstance(op.get("body"), type)]
    _, defs = models_json_schema(
        [(m, "serialization") for m in dict.fromkeys(models)], ref_template="#/components/schemas/{model}"
    )
    error = {
        "description": "Bad parameter (400) or not found (404); `param` names the parameter.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    paths: dict[str, Any] = {}
    for path, ops in all_paths.items():
        for method, op in ops.items():
            response = op["response"]
            content = (
                {"application/json": {"schema": {"$ref": f"#/components/schemas/{response.__name__}"}}}
                if isinstance(response, type)
                else response
            )
            params = [_parameter(p, "path") for p in op.get("path_parameters", [])]
            params += [_parameter(p) for p in op["parameters"]]
            operation: dict[str, Any] = {
                "summary": op["summary"],
                "parameters": params,
                "responses": {"200": {"description": "OK", "content": content}, "400": error, "404": error},
            }
            body = op.get("body")
            if body is not None:
                schema = {"$ref": f"#/components/schemas/{body.__name__}"} if isinstance(body, type) else body
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                }
            paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meterproxy API",
            "version": __version__,
            "description": "Read-only JSON API over the requests meterproxy recorded. Errors share one "
            "shape; costs are exact decimal numbers.",
        },
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"adminToken": []}],
        "paths": paths,
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(build_spec(request.app.get(API_DOCS)))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi_handler)

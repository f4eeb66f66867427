"""``/api/budgets`` (list, create, show, update, delete), budget events, webhook deliveries.

Budgets:

- ``GET /api/budgets``: every budget with its definition, ``source`` (config or
  api), ``spend_usd``, ``limit_usd``, ``percent``, the current period, the
  projection and ``state``: ``ok``, ``warning`` (a threshold below 100 % is
  crossed), ``exceeded`` (alert budget at or over its limit) or ``blocking``.
- ``POST /api/budgets`` (a budget definition as JSON) -> 201; 409 if the name is taken.
- ``GET|PUT|PATCH|DELETE /api/budgets/{name}``: PUT replaces the definition,
  PATCH merges top-level fields; budgets from the config file are read-only here (409).
- ``GET /api/budgets/{name}/events``: the events it raised, newest first.

``GET /api/webhooks/deliveries``: outbox rows newest first with every attempt
(``state``, ``event_id``, ``budget`` filters; ``limit`` 1..500). Endpoint
secrets and extra headers are never part of any response.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from meterproxy.api import ParamError, api_error, json_response, parse_int
from meterproxy.api.models import Cost
from meterproxy.api.openapi import document
from meterproxy.app_state import READERS
from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.feature import BUDGETS, BudgetEngine, BudgetError
from meterproxy.budgets.spend import BudgetState
from meterproxy.store.db import Db, Params
from meterproxy.store.queries import run_read

__all__ = ["budget_view", "setup"]


def budget_view(state: BudgetState, request: web.Request) -> dict[str, Any]:
    engine = request.app[BUDGETS]
    snap = engine.tracker.snapshot(state.spec.name, engine.clock())
    spec = state.spec
    view: dict[str, Any] = {
        "name": spec.name,
        "source": state.source,
        "scope": spec.scope.describe(),
        "period": spec.period,
        "timezone": None if state.period.rolling else str(state.tz.key),
        "limit_usd": spec.limit_usd,
        "thresholds": spec.thresholds,
        "action": spec.action,
        "projected": spec.projected,
        "notify_reset": spec.notify_reset,
        "webhooks": spec.webhooks,
    }
    if spec.action == "reserve":
        view["unpriced"] = spec.unpriced_policy
        view["unpriced_reserve_usd"] = spec.unpriced_reserve_usd
    if snap is None:  # deleted meanwhile
        return view
    if spec.action == "reserve":
        # Spend and holds apart: spend is recorded, holds are requests in flight (all replicas).
        view["reserved_usd"] = engine.ledger.reserved_usd(spec.name)
    if snap.exceeded:
        status = "blocking" if spec.action in ("block", "reserve") else "exceeded"
    elif any(snap.spend_usd * 100 >= t * snap.limit_usd for t in spec.thresholds if t < 100):
        status = "warning"
    else:
        status = "ok"
    view.update(snap.as_dict())
    view["state"] = status
    return view


def _engine(request: web.Request) -> BudgetEngine:
    return request.app[BUDGETS]


async def list_budgets(request: web.Request) -> web.Response:
    engine = _engine(request)
    await engine.refresh_held([s.spec.name for s in engine.tracker.states() if s.spec.action == "reserve"])
    return json_response({"budgets": [budget_view(s, request) for s in engine.tracker.states()]})


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=lambda t: json.loads(t, parse_float=Decimal))
    except ValueError as exc:
        raise ParamError("body", f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ParamError("body", "expected a JSON object")
    return body


def _invalid(exc: ValidationError) -> web.Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return api_error(400, "invalid_budget", problems)


def _engine_error(exc: Exception) -> web.Response:
    code = getattr(exc, "code", "invalid_budget")
    status = {"not_found": 404, "budget_exists": 409, "config_budget": 409}.get(code, 400)
    return api_error(status, code, str(exc))


async def create_budget(request: web.Request) -> web.Response:
    try:
        spec = BudgetSpec.model_validate(await _json_body(request))
        state = await _engine(request).create(spec)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValidationError as exc:
        return _invalid(exc)
    except BudgetError as exc:
        return _engine_error(exc)
    return json_response(budget_view(state, request), status=201)


async def show_budget(request: web.Request) -> web.Response:
    state = _engine(request).tracker.get(request.match_info["name"])
    if state is None:
        return api_error(404, "not_found", f"no budget named {request.match_info['name']!r}")
    if state.spec.action == "reserve":
        await _engine(request).refresh_held([state.spec.name])
    return json_response(budget_view(state, request))


async def update_budget(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    engine = _engine(request)
    try:
        body = await _json_body(request)
        if request.method == "PATCH":
            current = engine.tracker.get(name)
            if current is None:
                raise BudgetError("not_found", f"no budget named {name!r}")
            body = {**json.loads(current.spec.model_dump_json(exclude_none=True)), **body}
        if body.setdefault("name", name) != name:
            raise ParamError("name", "a budget cannot be renamed; create a new one")
        state = await engine.update(BudgetSpec.model_validate(body))
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    except ValidationError as exc:
        return _invalid(exc)
    except BudgetError as exc:
        return _engine_error(exc)
    return json_response(budget_view(state, request))


async def delete_budget(request: web.Request) -> web.Response:
    try:
        await _engine(request).delete(request.match_info["name"])
    except BudgetError as exc:
        return _engine_error(exc)
    return web.Response(status=204)


def _events(conn: Db, budget: str, limit: int) -> list[Any]:
    rows = conn.execute(
        "SELECT payload FROM budget_events WHERE budget = $1 ORDER BY created_at DESC, id LIMIT $2",
        [budget, limit],
    ).fetchall()
    return [json.loads(r[0], parse_float=Decimal) for r in rows]


async def budget_events(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        limit = parse_int("limit", request.query.get("limit"), 100, 1, 1000)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    events = await run_read(request.app[READERS], lambda c: _events(c, name, limit))
    return json_response({"events": events})


def _deliveries(conn: Db, filters: dict[str, str], limit: int) -> list[dict[str, Any]]:
    p = Params()
    where = ["1 = 1"]
    for key, column in (("state", "o.state"), ("event_id", "o.event_id"), ("budget", "e.budget")):
        if key in filters:
            where.append(f"{column} = {p(filters[key])}")
    rows = conn.execute(
        "SELECT o.id, o.event_id, e.type AS event_type, e.budget, o.endpoint, o.url, o.state, o.attempts, "
        "o.created_at, o.next_attempt_at, o.delivered_at, o.last_status, o.last_error "
        "FROM webhook_outbox o JOIN budget_events e ON e.id = o.event_id "
        f"WHERE {' AND '.join(where)} ORDER BY o.id DESC LIMIT {p(limit)}",
        p.values,
    ).fetchall()
    out = [dict(r) for r in rows]
    # Every listed row's attempts in one query (not one per row): at most `limit` ids.
    attempts: dict[int, list[dict[str, Any]]] = {item["id"]: [] for item in out}
    if attempts:
        ids = Params()
        marks = ids.many(attempts)
        for a in conn.execute(
            "SELECT outbox_id, attempt, at, status, error, duration_ms FROM webhook_attempts "
            f"WHERE outbox_id IN ({marks}) ORDER BY outbox_id, attempt",
            ids.values,
        ):
            attempt = dict(a)
            attempts[attempt.pop("outbox_id")].append(attempt)
    for item in out:
        item["next_attempt_at"] = item["next_attempt_at"] if item["state"] == "pending" else None
        item["attempt_log"] = attempts[item["id"]]
    return out


async def list_deliveries(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = parse_int("limit", query.get("limit"), 100, 1, 500)
    except ParamError as exc:
        return api_error(400, "bad_parameter", str(exc), exc.param)
    filters = {k: query[k] for k in ("state", "event_id", "budget") if query.get(k)}
    rows = await run_read(request.app[READERS], lambda c: _deliveries(c, filters, limit))
    return json_response({"deliveries": rows})


class BudgetView(BudgetSpec):
    """A budget as ``/api/budgets`` shows it: its definition (`BudgetSpec`'s fields), source and spend now."""

    scope: dict[str, Any] = Field(description="The scope's set fields (empty: every request).")  # type: ignore[assignment]
    source: Literal["config", "api"]
    spend_usd: Cost | None = None
    reserved_usd: Cost | None = Field(None, description="reserve budgets: held by requests in flight.")
    percent: Decimal | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    projected_spend_usd: Cost | None = None
    projected_exceed_at: datetime | None = None
    state: Literal["ok", "warning", "exceeded", "blocking"] | None = None


class BudgetsResponse(BaseModel):
    budgets: list[BudgetView]


_NAME = ["name"]
_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "/api/budgets",
        "get",
        {
            "summary": "Every budget with spend, limit, period, projection and state.",
            "parameters": [],
            "response": BudgetsResponse,
        },
    ),
    (
        "/api/budgets",
        "post",
        {
            "summary": "Create a budget; 201, or 409 if the name is taken.",
            "parameters": [],
            "body": BudgetSpec,
            "response": BudgetView,
        },
    ),
    (
        "/api/budgets/{name}",
        "get",
        {"summary": "One budget.", "parameters": [], "path_parameters": _NAME, "response": BudgetView},
    ),
    (
        "/api/budgets/{name}",
        "put",
        {
            "summary": "Replace a budget's definition (API budgets only).",
            "parameters": [],
            "path_parameters": _NAME,
            "body": BudgetSpec,
            "response": BudgetView,
        },
    ),
    (
        "/api/budgets/{name}",
        "patch",
        {
            "summary": "Merge top-level BudgetSpec fields into the definition.",
            "parameters": [],
            "path_parameters": _NAME,
            "body": {"type": "object", "description": "Some BudgetSpec fields."},
            "response": BudgetView,
        },
    ),
    (
        "/api/budgets/{name}",
        "delete",
        {
            "summary": "Delete a budget (API budgets only); 204.",
            "parameters": [],
            "path_parameters": _NAME,
            "response": _OBJECT,
        },
    ),
    (
        "/api/budgets/{name}/events",
        "get",
        {
            "summary": "Events the budget raised, newest first.",
            "parameters": ["limit"],
            "path_parameters": _NAME,
            "response": _OBJECT,
        },
    ),
    (
        "/api/webhooks/deliveries",
        "get",
        {
            "summary": "Webhook outbox rows with their attempts, newest first.",
            "parameters": ["limit"],
            "response": _OBJECT,
        },
    ),
]


def setup(app: web.Application) -> None:
    """Listed after ``meterproxy.budgets.feature`` in `meterproxy.app.FEATURES` (its engine serves these)."""
    app.router.add_get("/api/budgets", list_budgets)
    app.router.add_post("/api/budgets", create_budget)
    app.router.add_get("/api/budgets/{name}", show_budget)
    app.router.add_put("/api/budgets/{name}", update_budget)
    app.router.add_patch("/api/budgets/{name}", update_budget)
    app.router.add_delete("/api/budgets/{name}", delete_budget)
    app.router.add_get("/api/budgets/{name}/events", budget_events)
    app.router.add_get("/api/webhooks/deliveries", list_deliveries)
    for path, method, operation in _OPERATIONS:
        document(app, path, method, operation)

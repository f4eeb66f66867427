"""Budgets' tables (migration set ``meterproxy.budgets``) and the SQL that reads and writes them.

Tables:

- ``budgets``: budgets created through the API or CLI (config-file budgets are
  not copied here; the config file stays their single source).
- ``budget_events``: every alert ever raised. ``UNIQUE (budget, type,
  period_start, threshold)`` is what makes "exactly one event per budget,
  threshold and period" hold across restarts and races: an event is inserted
  with ``ON CONFLICT DO NOTHING`` and only a row that was actually inserted gets
  outbox entries.
- ``webhook_outbox``: one row per event x endpoint, inserted in the same
  transaction as the event, so an event is never recorded without its
  deliveries (or delivered without being recorded).
- ``webhook_attempts``: one row per HTTP attempt, for ``/api/webhooks/deliveries``.
- ``budget_reservations``: the worst-case holds of ``reserve`` budgets' requests in
  flight (see `meterproxy.budgets.reserve`).

Write functions take the writer's connection (they run on the writer thread via
``StoreWriter.call``); read functions take any connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from meterproxy.budgets.definition import BudgetScope, BudgetSpec
from meterproxy.exact_json import dumps
from meterproxy.store import Db, Migrations, Params
from meterproxy.store.dialect import Dialect
from meterproxy.timestamps import format_ts

__all__ = [
    "budget_migrations",
    "claim_due",
    "delete_budget",
    "fired_events",
    "insert_events",
    "load_api_budgets",
    "public_event",
    "record_attempt",
    "save_budget",
    "scope_where",
    "spend_buckets",
]

budget_migrations = Migrations("meterproxy.budgets")


@budget_migrations()
def m001_budget_tables(db: Db) -> None:
    t, serial = db.dialect.text, db.dialect.serial_key
    db.execute(
        f"""
        CREATE TABLE budgets (
            name {t} PRIMARY KEY,
            spec {t} NOT NULL,
            created_at {t} NOT NULL,
            updated_at {t} NOT NULL
        )
        """
    )
    db.execute(
        f"""
        CREATE TABLE budget_events (
            id {t} PRIMARY KEY,
            budget {t} NOT NULL,
            type {t} NOT NULL,
            period_start {t} NOT NULL,
            threshold {t} NOT NULL,
            created_at {t} NOT NULL,
            payload {t} NOT NULL,
            UNIQUE (budget, type, period_start, threshold)
        )
        """
    )
    db.execute(
        f"""
        CREATE TABLE webhook_outbox (
            id {serial},
            event_id {t} NOT NULL REFERENCES budget_events(id),
            endpoint {t} NOT NULL,
            url {t} NOT NULL,
            state {t} NOT NULL DEFAULT 'pending',
            attempts BIGINT NOT NULL DEFAULT 0,
            created_at {t} NOT NULL,
            next_attempt_at {t} NOT NULL,
            delivered_at {t},
            last_status BIGINT,
            last_error {t},
            UNIQUE (event_id, endpoint)
        )
        """
    )
    db.execute("CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)")
    db.execute(
        f"""
        CREATE TABLE webhook_attempts (
            id {serial},
            outbox_id BIGINT NOT NULL REFERENCES webhook_outbox(id),
            attempt BIGINT NOT NULL,
            at {t} NOT NULL,
            status BIGINT,
            error {t},
            duration_ms DOUBLE PRECISION
        )
        """
    )
    db.execute("CREATE INDEX webhook_attempts_outbox ON webhook_attempts (outbox_id)")


@budget_migrations()
def m002_budget_reservations(db: Db) -> None:
    """Reserve budgets' holds (`meterproxy.budgets.reserve`): one row per request x budget."""
    t = db.dialect.text
    db.execute(
        f"""
        CREATE TABLE budget_reservations (
            request_id {t} NOT NULL,
            budget {t} NOT NULL,
            amount_pico BIGINT NOT NULL,
            created_at {t} NOT NULL,
            expires_at {t} NOT NULL,
            PRIMARY KEY (request_id, budget)
        )
        """
    )
    db.execute("CREATE INDEX budget_reservations_budget ON budget_reservations (budget, expires_at)")


def scope_where(scope: BudgetScope, p: Params, dialect: Dialect) -> str:
    """SQL over ``requests`` selecting the rows in ``scope`` (mirrors `spend.in_scope`)."""
    clauses = ["cost_pico IS NOT NULL"]
    for column, value in (
        ("upstream", scope.upstream),
        ("provider", scope.provider),
        ('"user"', scope.user),
        ("key_fingerprint", scope.key),
    ):
        if value is not None:
            clauses.append(f"{column} = {p(value)}")
    if scope.model is not None:
        model = p(scope.model)
        clauses.append(f"(model = {model} OR requested_model = {model})")
    for key, value in scope.tags.items():
        clauses.append(f"{dialect.json_text('tags', p, key)} = {p(value)}")
    return " AND ".join(clauses)


def spend_buckets(conn: Db, scope: BudgetScope, since: datetime) -> list[tuple[int, int]]:
    """``(unix second, picodollars)`` per second of stored spend in scope since ``since``."""
    p = Params()
    since_at = p(format_ts(since))
    where = scope_where(scope, p, conn.dialect)
    sec = conn.dialect.epoch_seconds("ts")
    rows = conn.execute(
        f"SELECT {sec} AS sec, SUM(cost_pico) FROM requests WHERE ts >= {since_at} AND {where} "
        "GROUP BY 1 ORDER BY 1",
        p.values,
    ).fetchall()
    return [(int(sec), int(pico)) for sec, pico in rows]


def fired_events(conn: Db, budget: str, since: datetime) -> list[tuple[str, str, str]]:
    """``(type, period_start, threshold)`` of the budget's events raised since ``since``."""
    rows = conn.execute(
        "SELECT type, period_start, threshold FROM budget_events WHERE budget = $1 AND created_at >= $2",
        [budget, format_ts(since)],
    ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def insert_events(
    conn: Db, events: Iterable[dict[str, Any]], endpoints: dict[str, list[tuple[str, str]]]
) -> list[str]:
    """Insert events (ignoring ones already raised) and their outbox rows; the new events' ids.

    ``endpoints`` maps an event id to the ``(endpoint name, url)`` pairs it goes to.
    """
    inserted: list[str] = []
    for event in events:
        cur = conn.execute(
            "INSERT INTO budget_events (id, budget, type, period_start, threshold, created_at, payload) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            [
                event["id"],
                event["budget"]["name"],
                event["type"],
                event["key_period_start"],
                event["key_threshold"],
                event["timestamp"],
                dumps(public_event(event)),
            ],
        )
        if cur.rowcount != 1:
            continue
        inserted.append(event["id"])
        for name, url in endpoints.get(event["id"], []):
            conn.execute(
                "INSERT INTO webhook_outbox (event_id, endpoint, url, created_at, next_attempt_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [event["id"], name, url, event["timestamp"], event["timestamp"]],
            )
    return inserted


def public_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event as sent and shown: without its internal key fields."""
    return {k: v for k, v in event.items() if not k.startswith("key_")}


def claim_due(conn: Db, ids: list[int], now: datetime, lease_until: datetime) -> list[int]:
    """Claim due outbox rows for one delivery attempt; the ids this process got.

    Moving ``next_attempt_at`` to the end of the lease is the claim: another
    worker process scanning the outbox no longer sees the row as due, and if
    this process dies mid-attempt the row becomes due again when the lease ends.
    """
    claimed = []
    for outbox_id in ids:
        cur = conn.execute(
            "UPDATE webhook_outbox SET next_attempt_at = $1 "
            "WHERE id = $2 AND state = 'pending' AND next_attempt_at <= $3",
            [format_ts(lease_until), outbox_id, format_ts(now)],
        )
        if cur.rowcount == 1:
            claimed.append(outbox_id)
    return claimed


def release_claims(conn: Db, claims: dict[int, datetime], now: datetime) -> int:
    """Give back claims whose attempt never ran to its end (a clean shutdown): due again at ``now``.

    Only a row still holding exactly our lease is touched: one whose attempt
    was recorded after all (pending with a new time, or delivered) is left alone.
    """
    released = 0
    for outbox_id, lease_until in claims.items():
        cur = conn.execute(
            "UPDATE webhook_outbox SET next_attempt_at = $1 "
            "WHERE id = $2 AND state = 'pending' AND next_attempt_at = $3",
            [format_ts(now), outbox_id, format_ts(lease_until)],
        )
        released += cur.rowcount
    return released


def record_attempt(
    conn: Db,
    outbox_id: int,
    *,
    at: datetime,
    status: int | None,
    error: str | None,
    duration_ms: float,
    state: str,
    next_attempt_at: datetime | None,
) -> None:
    attempt = conn.execute(
        "UPDATE webhook_outbox SET attempts = attempts + 1, state = $1, last_status = $2, last_error = $3, "
        "next_attempt_at = COALESCE($4, next_attempt_at), delivered_at = $5 WHERE id = $6 RETURNING attempts",
        [
            state,
            status,
            error,
            format_ts(next_attempt_at) if next_attempt_at else None,
            format_ts(at) if state == "delivered" else None,
            outbox_id,
        ],
    ).fetchone()
    conn.execute(
        "INSERT INTO webhook_attempts (outbox_id, attempt, at, status, error, duration_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [outbox_id, attempt[0] if attempt else 0, format_ts(at), status, error, duration_ms],
    )


def save_budget(conn: Db, spec: BudgetSpec, now: datetime, *, create: bool) -> bool:
    """Insert (``create``) or replace an API-managed budget; False if that is not possible."""
    text = spec.model_dump_json(exclude_none=True)
    if create:
        cur = conn.execute(
            "INSERT INTO budgets (name, spec, created_at, updated_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING",
            [spec.name, text, format_ts(now), format_ts(now)],
        )
    else:
        cur = conn.execute(
            "UPDATE budgets SET spec = $1, updated_at = $2 WHERE name = $3", [text, format_ts(now), spec.name]
        )
    return cur.rowcount == 1


def delete_budget(conn: Db, name: str) -> bool:
    return conn.execute("DELETE FROM budgets WHERE name = $1", [name]).rowcount == 1


def load_api_budgets(conn: Db) -> list[BudgetSpec]:
    if conn.execute(conn.dialect.table_exists, ["budgets"]).fetchone() is None:
        return []  # a database the proxy has not migrated yet
    rows = conn.execute("SELECT spec FROM budgets ORDER BY name").fetchall()
    return [BudgetSpec.model_validate_json(r[0]) for r in rows]

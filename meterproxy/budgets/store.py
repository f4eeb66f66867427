"""Budgets' tables (migration set ``meterproxy.budgets``) and the SQL that reads and writes them.

Tables:

- ``budgets``: budgets created through the API or CLI (config-file budgets are
  not copied here; the config file stays their single source).
- ``budget_events``: every alert ever raised. ``UNIQUE (budget, type,
  period_start, threshold)`` is what makes "exactly one event per budget,
  threshold and period" hold across restarts and races: an event is inserted
  with ``INSERT OR IGNORE`` and only a row that was actually inserted gets
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

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlite_utils
from sqlite_utils import Migrations

from meterproxy.budgets.definition import BudgetScope, BudgetSpec
from meterproxy.exact_json import dumps
from meterproxy.store import register_migrations
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

budget_migrations = register_migrations(Migrations("meterproxy.budgets"))


@budget_migrations()
def m001_budget_tables(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE budgets (
            name TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE budget_events (
            id TEXT PRIMARY KEY,
            budget TEXT NOT NULL,
            type TEXT NOT NULL,
            period_start TEXT NOT NULL,
            threshold TEXT NOT NULL,
            created_at TEXT NOT NULL,
            payload TEXT NOT NULL,
            UNIQUE (budget, type, period_start, threshold)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE webhook_outbox (
            id INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL REFERENCES budget_events(id),
            endpoint TEXT NOT NULL,
            url TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            delivered_at TEXT,
            last_status INTEGER,
            last_error TEXT,
            UNIQUE (event_id, endpoint)
        )
        """
    )
    db.execute("CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt_at)")
    db.execute(
        """
        CREATE TABLE webhook_attempts (
            id INTEGER PRIMARY KEY,
            outbox_id INTEGER NOT NULL REFERENCES webhook_outbox(id),
            attempt INTEGER NOT NULL,
            at TEXT NOT NULL,
            status INTEGER,
            error TEXT,
            duration_ms REAL
        )
        """
    )
    db.execute("CREATE INDEX webhook_attempts_outbox ON webhook_attempts (outbox_id)")


@budget_migrations()
def m002_budget_reservations(db: sqlite_utils.Database) -> None:
    """Reserve budgets' holds (`meterproxy.budgets.reserve`): one row per request x budget."""
    db.execute(
        """
        CREATE TABLE budget_reservations (
            request_id TEXT NOT NULL,
            budget TEXT NOT NULL,
            amount_pico INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            PRIMARY KEY (request_id, budget)
        )
        """
    )
    db.execute("CREATE INDEX budget_reservations_budget ON budget_reservations (budget, expires_at)")


def scope_where(scope: BudgetScope) -> tuple[str, list[Any]]:
    """SQL over ``requests`` selecting the rows in ``scope`` (mirrors `spend.in_scope`)."""
    clauses = ["cost_pico IS NOT NULL"]
    params: list[Any] = []
    for column, value in (
        ("upstream", scope.upstream),
        ("provider", scope.provider),
        ("user", scope.user),
        ("key_fingerprint", scope.key),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if scope.model is not None:
        clauses.append("(model = ? OR requested_model = ?)")
        params += [scope.model, scope.model]
    for key, value in scope.tags.items():
        clauses.append("json_extract(tags, ?) = ?")
        params += ['$."' + key.replace('"', '""') + '"', value]
    return " AND ".join(clauses), params


def spend_buckets(conn: sqlite3.Connection, scope: BudgetScope, since: datetime) -> list[tuple[int, int]]:
    """``(unix second, picodollars)`` per second of stored spend in scope since ``since``."""
    where, params = scope_where(scope)
    rows = conn.execute(
        f"SELECT CAST(strftime('%s', substr(ts, 1, 19)) AS INTEGER) AS sec, SUM(cost_pico) "
        f"FROM requests WHERE ts >= ? AND {where} GROUP BY sec ORDER BY sec",
        [format_ts(since), *params],
    ).fetchall()
    return [(int(sec), int(pico)) for sec, pico in rows]


def fired_events(conn: sqlite3.Connection, budget: str, since: datetime) -> list[tuple[str, str, str]]:
    """``(type, period_start, threshold)`` of the budget's events raised since ``since``."""
    rows = conn.execute(
        "SELECT type, period_start, threshold FROM budget_events WHERE budget = ? AND created_at >= ?",
        [budget, format_ts(since)],
    ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def insert_events(
    conn: sqlite3.Connection, events: Iterable[dict[str, Any]], endpoints: dict[str, list[tuple[str, str]]]
) -> list[str]:
    """Insert events (ignoring ones already raised) and their outbox rows; the new events' ids.

    ``endpoints`` maps an event id to the ``(endpoint name, url)`` pairs it goes to.
    """
    inserted: list[str] = []
    for event in events:
        cur = conn.execute(
            "INSERT OR IGNORE INTO budget_events "
            "(id, budget, type, period_start, threshold, created_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                "INSERT OR IGNORE INTO webhook_outbox (event_id, endpoint, url, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [event["id"], name, url, event["timestamp"], event["timestamp"]],
            )
    return inserted


def public_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event as sent and shown: without its internal key fields."""
    return {k: v for k, v in event.items() if not k.startswith("key_")}


def claim_due(conn: sqlite3.Connection, ids: list[int], now: datetime, lease_until: datetime) -> list[int]:
    """Claim due outbox rows for one delivery attempt; the ids this process got.

    Moving ``next_attempt_at`` to the end of the lease is the claim: another
    worker process scanning the outbox no longer sees the row as due, and if
    this process dies mid-attempt the row becomes due again when the lease ends.
    """
    claimed = []
    for outbox_id in ids:
        cur = conn.execute(
            "UPDATE webhook_outbox SET next_attempt_at = ? "
            "WHERE id = ? AND state = 'pending' AND next_attempt_at <= ?",
            [format_ts(lease_until), outbox_id, format_ts(now)],
        )
        if cur.rowcount == 1:
            claimed.append(outbox_id)
    return claimed


def record_attempt(
    conn: sqlite3.Connection,
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
        "UPDATE webhook_outbox SET attempts = attempts + 1, state = ?, last_status = ?, last_error = ?, "
        "next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ? WHERE id = ? RETURNING attempts",
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
        "VALUES (?, ?, ?, ?, ?, ?)",
        [outbox_id, attempt[0] if attempt else 0, format_ts(at), status, error, duration_ms],
    )


def save_budget(conn: sqlite3.Connection, spec: BudgetSpec, now: datetime, *, create: bool) -> bool:
    """Insert (``create``) or replace an API-managed budget; False if that is not possible."""
    text = spec.model_dump_json(exclude_none=True)
    if create:
        cur = conn.execute(
            "INSERT OR IGNORE INTO budgets (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)",
            [spec.name, text, format_ts(now), format_ts(now)],
        )
    else:
        cur = conn.execute(
            "UPDATE budgets SET spec = ?, updated_at = ? WHERE name = ?", [text, format_ts(now), spec.name]
        )
    return cur.rowcount == 1


def delete_budget(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("DELETE FROM budgets WHERE name = ?", [name]).rowcount == 1


def load_api_budgets(conn: sqlite3.Connection) -> list[BudgetSpec]:
    try:
        rows = conn.execute("SELECT spec FROM budgets ORDER BY name").fetchall()
    except sqlite3.OperationalError:  # a database the proxy has not migrated yet
        return []
    return [BudgetSpec.model_validate_json(r[0]) for r in rows]

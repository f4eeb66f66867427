"""``GET /api/webhooks/deliveries`` reads every listed row's attempts in one query, not one per row."""

from __future__ import annotations

from pathlib import Path

from meterproxy.budgets.api import _deliveries
from meterproxy.store.backend import apply_migrations, connect
from meterproxy.store.sqlite import connect_sqlite


def _outbox(db: Path, rows: int) -> None:
    conn = connect(db)
    apply_migrations(conn)
    with conn.transaction():
        for i in range(rows):
            conn.execute(
                "INSERT INTO budget_events (id, budget, type, period_start, threshold, created_at, payload) "
                "VALUES ($1, 'b', 'budget.threshold', '2026-01-01', $2, '2026-01-01T00:00:00Z', '{}')",
                [f"evt_{i}", str(i)],
            )
            conn.execute(
                "INSERT INTO webhook_outbox (id, event_id, endpoint, url, state, attempts, created_at, "
                "next_attempt_at) VALUES ($1, $2, 'hook', 'http://127.0.0.1:9/x', 'pending', $3, "
                "'2026-01-01T00:00:00Z', '2026-01-01T00:01:00Z')",
                [i + 1, f"evt_{i}", i],
            )
            for attempt in range(1, i + 1):  # row i has i attempts: 0, 1, 2, ...
                conn.execute(
                    "INSERT INTO webhook_attempts (outbox_id, attempt, at, status, error, duration_ms) "
                    "VALUES ($1, $2, '2026-01-01T00:00:00Z', 503, NULL, 1.5)",
                    [i + 1, attempt],
                )
    conn.close()


def test_deliveries_list_every_attempt_with_two_queries_whatever_the_row_count(tmp_path: Path) -> None:
    db = tmp_path / "meter.db"
    _outbox(db, 30)
    conn = connect_sqlite(db, readonly=True)
    statements: list[str] = []
    conn.raw.set_trace_callback(statements.append)
    rows = _deliveries(conn, {}, 100)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 2
    assert [r["id"] for r in rows] == list(range(30, 0, -1))
    for row in rows:
        assert [a["attempt"] for a in row["attempt_log"]] == list(range(1, row["attempts"] + 1))
        assert all("outbox_id" not in a for a in row["attempt_log"])


def test_deliveries_with_nothing_to_list_make_no_attempt_query(tmp_path: Path) -> None:
    db = tmp_path / "meter.db"
    _outbox(db, 0)
    conn = connect_sqlite(db, readonly=True)
    assert _deliveries(conn, {"state": "delivered"}, 10) == []

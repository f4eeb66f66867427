"""CPU cost of budgets on the request path, and webhook latency after a crossing.

- **gate**: `SpendTracker.blocking` for one not-yet-forwarded request, with N
  ``block`` budgets (half in scope of the request), per request.
- **commit**: `SpendTracker.records_committed` + alert evaluation per committed
  record, with N budgets in scope (what the writer thread adds per record).
- **load**: reading one budget's spend from a database of R stored rows (start,
  resync, create).

Each figure is the best of several rounds of CPU time (``time.process_time``).
The end-to-end webhook latency (crossing request finished -> signed delivery
accepted by a real receiver) is printed by
``pytest -s tests/test_budget_webhooks.py -k signed_once``.

Run ``python bench/budgets_bench.py``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from meterproxy.budgets.alerts import AlertDetector
from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.spend import SpendTracker
from meterproxy.budgets.store import spend_buckets
from meterproxy.store.backend import apply_migrations, connect, read_connection
from meterproxy.store.schema import record_to_row
from meterproxy.store.writer import INSERT_REQUEST
from meterproxy.testing import make_record


def best(fn: Callable[[], None], n: int, rounds: int = 5) -> float:
    """Best per-call CPU seconds over ``rounds`` of ``n`` calls."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t0) / n)
    return min(times)


def tracker_with(n: int, action: str) -> SpendTracker:
    tracker = SpendTracker("UTC")
    for i in range(n):
        scope = {"user": "alice"} if i % 2 == 0 else {"user": f"user{i}"}
        spec = BudgetSpec.model_validate(
            {"name": f"b{i}", "limit_usd": "1000000", "action": action, "scope": scope}
        )
        state = tracker.new_state(spec, "config")
        state.advance(datetime.now(UTC))
        tracker.install(state, [])
    return tracker


def main() -> None:
    record = make_record(user="alice", cost_usd=Decimal("0.0123"))
    for n in (1, 10, 100):
        tracker = tracker_with(n, "block")
        now = datetime.now(UTC)
        gate = best(lambda t=tracker, at=now: t.blocking(record, at), 2000)  # type: ignore[misc]
        print(f"gate, {n:>3} block budgets: {gate * 1e6:8.2f} us/request")
    for n in (1, 10, 100):
        tracker = tracker_with(n, "alert")
        detector = AlertDetector(tracker, lambda events: None)
        now = datetime.now(UTC)

        def commit(t: SpendTracker = tracker, d: AlertDetector = detector, at: datetime = now) -> None:
            t.records_committed([record], lambda s, r: d.record_added(s, r, at))

        print(f"commit, {n:>3} budgets:      {best(commit, 1000) * 1e6:8.2f} us/record")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        conn = connect(db)
        apply_migrations(conn)
        start = datetime.now(UTC) - timedelta(days=20)
        rows = 200_000
        records = [
            make_record(ts=start + timedelta(seconds=i * 8), user=f"u{i % 50}", cost_usd=Decimal("0.001"))
            for i in range(rows)
        ]
        with conn.transaction():
            conn.executemany(INSERT_REQUEST, [record_to_row(r) for r in records])
        scope = BudgetSpec.model_validate({"name": "x", "limit_usd": 1}).scope
        user_scope = BudgetSpec.model_validate({"name": "x", "limit_usd": 1, "scope": {"user": "u7"}}).scope
        ro = read_connection(db)
        for label, sc in (("global", scope), ("user", user_scope)):
            t0 = time.perf_counter()
            buckets = spend_buckets(ro, sc, start)
            took = time.perf_counter() - t0
            print(f"load {label} budget over {rows} rows: {took * 1000:7.1f} ms ({len(buckets)} buckets)")
        ro.close()
        conn.close()


if __name__ == "__main__":
    main()

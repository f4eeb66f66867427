"""Spend per budget: loaded from the stored rows, then kept current as records commit.

Where the truth lives: the ``requests`` table (``cost_pico``, exact integer
picodollars). A budget's spend is the sum over its scope and current window,
so it survives restarts and counts every request that was recorded, streams
and client-abandoned ones included.

How it stays current without querying per request: each budget keeps its
window as per-second buckets ``(unix second, picodollars)`` plus their running
total. Two things change them, and both happen on the store writer's thread,
so they are ordered with the commits themselves:

- `SpendTracker.load` (run through ``StoreWriter.call``) reads the buckets of
  the current window from the database and installs the budget: everything
  committed before is in the sum, everything committed after arrives through
- `SpendTracker.records_committed` (a ``StoreWriter.on_commit`` listener),
  which adds each priced record in scope; no record is counted twice or missed.

A third keeps the block gate exact between a request's end and its commit
(the writer may linger, and in ``batch`` mode nothing waits for it):
`SpendTracker.record_finished` (a meter sink that runs on the event loop
before the store sink, when the request finishes) adds the record's cost to
each budget in scope as *pending*; `records_committed` moves it from pending
to the buckets. The gate checks committed plus pending, so sequential requests
stop exactly at the limit in every durability mode. A record the writer drops
(queue full) stays pending until the next restart or resync: counted, never
missed.

The clock moves windows forward: `SpendTracker.advance` drops buckets older
than the window start (a rolling window's tail, or the whole previous calendar
period at rollover). Readers on the event loop (the gate, the API) take
consistent snapshots under a lock; nothing here does I/O on the event loop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from meterproxy.budgets.definition import BudgetScope, BudgetSpec, Period, period_bounds, zone
from meterproxy.money import from_pico, to_pico
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord

__all__ = ["BudgetState", "Snapshot", "SpendTracker", "in_scope"]


def in_scope(scope: BudgetScope, record: RequestRecord, *, before_forwarding: bool = False) -> bool:
    """Whether ``record`` counts against ``scope`` (mirrors `store.scope_where`).

    Before forwarding only the requested model is known; afterwards either the
    answered or the requested model may match.
    """
    if scope.upstream is not None and record.upstream != scope.upstream:
        return False
    if scope.provider is not None and record.provider != scope.provider:
        return False
    if scope.user is not None and record.user != scope.user:
        return False
    if scope.key is not None and record.key_fingerprint != scope.key:
        return False
    if scope.model is not None:
        models = (record.requested_model,) if before_forwarding else (record.model, record.requested_model)
        if scope.model not in models:
            return False
    return all(record.tags.get(k) == v for k, v in scope.tags.items())


@dataclass(slots=True)
class Snapshot:
    """One budget at one moment, as the API, the gate and the alerts see it."""

    spend_usd: Decimal
    limit_usd: Decimal
    percent: Decimal
    period_start: datetime
    period_end: datetime
    projected_spend_usd: Decimal | None
    projected_exceed_at: datetime | None

    @property
    def exceeded(self) -> bool:
        return self.spend_usd >= self.limit_usd

    def as_dict(self) -> dict[str, object]:
        return {
            "spend_usd": self.spend_usd,
            "limit_usd": self.limit_usd,
            "percent": self.percent,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "projected_spend_usd": self.projected_spend_usd,
            "projected_exceed_at": self.projected_exceed_at,
        }


@dataclass(slots=True)
class BudgetState:
    spec: BudgetSpec
    source: str  # "config" or "api"
    period: Period
    tz: ZoneInfo
    buckets: deque[list[int]] = field(default_factory=deque)
    total_pico: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    #: Spend (picodollars) below which no threshold alert can fire; 0 = evaluate always.
    armed_pico: int = 0
    #: The calendar period start the alerts last looked at (for ``budget.reset``).
    seen_period: datetime | None = None
    #: Events already raised for the current windows: (type, period_start, threshold).
    fired: set[tuple[str, str, str]] = field(default_factory=set)
    #: Cost of finished records in scope not committed yet (picodollars); the gate counts it.
    pending_pico: int = 0

    def add(self, second: int, pico: int) -> None:
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += pico
        elif self.buckets and self.buckets[-1][0] > second:
            # Records commit roughly in ts order; keep the deque sorted anyway.
            items = sorted([*([b[0], b[1]] for b in self.buckets), [second, pico]])
            self.buckets = deque(items)
        else:
            self.buckets.append([second, pico])
        self.total_pico += pico

    def advance(self, now: datetime) -> tuple[datetime, datetime]:
        """Move the window to ``now``: drop buckets before its start; the window's bounds."""
        start, end = self.window_start, self.window_end
        if not self.period.rolling and start is not None and end is not None and start <= now < end:
            return start, end  # same calendar period: nothing to drop
        start, end = period_bounds(self.period, self.tz, now)
        if self.window_start != start:
            if self.window_start is not None and not self.period.rolling:
                # A new calendar period: the previous one's alerts no longer apply.
                self.fired = {f for f in self.fired if f[1] >= format_ts(start)}
                self.armed_pico = 0
            self.window_start = start
            first = int(start.timestamp())
            first += 1 if start.timestamp() > first else 0
            while self.buckets and self.buckets[0][0] < first:
                self.total_pico -= self.buckets.popleft()[1]
                self.armed_pico = 0  # spend fell: a rolling threshold may re-arm
        self.window_end = end
        return start, end

    @property
    def limit_pico(self) -> int:
        return to_pico(self.spec.limit_usd)

    def spent(self, now: datetime) -> bool:
        """Whether spend, finished-but-uncommitted requests included, has reached the limit."""
        self.advance(now)
        return self.total_pico + self.pending_pico >= self.limit_pico

    def snapshot(self, now: datetime) -> Snapshot:
        start, end = self.advance(now)
        spend = from_pico(self.total_pico) or Decimal(0)
        limit = self.spec.limit_usd
        percent = (spend * 100 / limit).quantize(Decimal("0.01"))
        projected: Decimal | None = None
        exceed_at: datetime | None = None
        elapsed = (now - start).total_seconds()
        total = (end - start).total_seconds()
        if not self.period.rolling and elapsed >= min(3600.0, total / 10):
            rate = spend / Decimal(elapsed)  # USD per second so far this period
            projected = (spend + rate * Decimal((end - now).total_seconds())).quantize(Decimal("1e-6"))
            if rate > 0 and spend < limit:
                seconds = (limit - spend) / rate
                if seconds < Decimal((end - now).total_seconds()):
                    exceed_at = now + timedelta(seconds=float(seconds))
        return Snapshot(spend, limit, percent, start, end, projected, exceed_at)


class SpendTracker:
    """Every budget's state; mutated on the writer thread, read anywhere under the lock."""

    def __init__(self, default_timezone: str = "UTC") -> None:
        self.default_tz = zone(default_timezone)
        self._lock = threading.Lock()
        self._budgets: dict[str, BudgetState] = {}
        # record id -> (budget, picodollars) counted as pending, until the record commits.
        self._pending: dict[str, list[tuple[BudgetState, int]]] = {}

    @property
    def empty(self) -> bool:
        """No budget at all (the common case): nothing to check or count per request.

        Read without the lock: a budget installed on another thread at this very moment
        is seen by the next request, exactly as when the lock is taken a moment earlier.
        """
        return not self._budgets

    def new_state(self, spec: BudgetSpec, source: str) -> BudgetState:
        tz = zone(spec.timezone) if spec.timezone else self.default_tz
        return BudgetState(spec=spec, source=source, period=Period.parse(spec.period), tz=tz)

    def install(self, state: BudgetState, buckets: list[tuple[int, int]]) -> None:
        """Install a loaded budget (call on the writer thread, after reading ``buckets``)."""
        state.buckets = deque([s, p] for s, p in buckets)
        state.total_pico = sum(p for _, p in buckets)
        with self._lock:
            self._budgets[state.spec.name] = state

    def remove(self, name: str) -> BudgetState | None:
        with self._lock:
            return self._budgets.pop(name, None)

    def get(self, name: str) -> BudgetState | None:
        with self._lock:
            return self._budgets.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._budgets)

    def states(self) -> list[BudgetState]:
        with self._lock:
            return [self._budgets[n] for n in sorted(self._budgets)]

    def states_unlocked(self) -> list[BudgetState]:
        """Like `states`, for a caller already holding `locked`."""
        return [self._budgets[n] for n in sorted(self._budgets)]

    def record_finished(self, record: RequestRecord) -> None:
        """A request just finished (before its commit): count its cost as pending (meter sink)."""
        if record.cost_usd is None or not self._budgets:
            return
        pico = to_pico(record.cost_usd)
        with self._lock:
            counted = []
            for state in self._budgets.values():
                if not in_scope(state.spec.scope, record):
                    continue
                if state.window_start is not None and record.ts < state.window_start:
                    continue
                state.pending_pico += pico
                counted.append((state, pico))
            if counted:
                self._pending[record.id] = counted

    def records_committed(
        self, records: list[RequestRecord], on_added: Callable[[BudgetState, RequestRecord], None]
    ) -> None:
        """Add committed priced records to every budget in scope.

        ``on_added(state, record)`` is called under the lock right after each
        addition, so alerts see the spend exactly as this record left it.
        """
        with self._lock:
            if not self._budgets and not self._pending:
                return  # no budget (the default): no record's cost needs converting
            for record in records:
                for state, pending in self._pending.pop(record.id, ()):
                    state.pending_pico -= pending
                if record.cost_usd is None:
                    continue
                pico = to_pico(record.cost_usd)
                second = int(record.ts.timestamp())
                for state in self._budgets.values():
                    if not in_scope(state.spec.scope, record):
                        continue
                    if state.window_start is not None and record.ts < state.window_start:
                        continue  # belongs to a period that is already over
                    state.add(second, pico)
                    on_added(state, record)

    def snapshot(self, name: str, now: datetime) -> Snapshot | None:
        with self._lock:
            state = self._budgets.get(name)
            return None if state is None else state.snapshot(now)

    def blocking(self, record: RequestRecord, now: datetime) -> tuple[BudgetState, Snapshot] | None:
        """The first spent ``block`` budget whose scope covers this not-yet-forwarded request."""
        with self._lock:
            for name in sorted(self._budgets):
                state = self._budgets[name]
                if state.spec.action != "block":
                    continue
                if not in_scope(state.spec.scope, record, before_forwarding=True):
                    continue
                if state.spent(now):
                    return state, state.snapshot(now)
        return None

    def locked(self) -> threading.Lock:
        return self._lock

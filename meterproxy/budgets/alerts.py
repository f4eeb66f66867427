"""Threshold crossings -> budget events: exactly one per budget, type, threshold and period.

Detection runs at two moments:

- **a record committed** (`AlertDetector.record_added`, on the writer thread,
  under the tracker lock, right after the record's cost was added): the event
  names that record as the one that crossed;
- **a check** (`AlertDetector.check_all`): at start (crossings that happened
  while the proxy was down, or whose event was lost to a crash, are raised
  now, without a request) and then periodically (projections, rollover
  ``budget.reset``, rolling windows re-arming).

Exactly once: the in-memory ``fired`` set (loaded from ``budget_events`` at
start) avoids re-raising in the common case, and the table's UNIQUE key makes
it a guarantee: a duplicate insert is ignored and gets no outbox rows.

Event types: ``budget.threshold_crossed`` (a threshold below 100 %),
``budget.exceeded`` (the 100 % threshold: the limit), ``budget.projected_overrun``
(opt-in) and ``budget.reset`` (opt-in; a new calendar period began). For a
calendar period the key's period is the period start. A rolling window has no
start: a threshold fires on an upward crossing, re-arms once spend falls back
below it, and its key is the window-length slot of the crossing (``floor(t /
window) * window``), so two processes that see the same crossing agree on one
event, and a rolling threshold fires at most once per window length.

Events are built here and handed to ``emit`` (which persists them through the
writer); nothing here does I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meterproxy.budgets.spend import BudgetState, Snapshot, SpendTracker
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord

__all__ = ["EVENT_TYPES", "AlertDetector", "build_event"]

EVENT_TYPES = (
    "budget.threshold_crossed",
    "budget.exceeded",
    "budget.projected_overrun",
    "budget.reset",
)

Event = dict[str, Any]


def _threshold_text(value: Decimal | None) -> str:
    return "" if value is None else format(value.normalize(), "f")


def build_event(
    kind: str,
    state: BudgetState,
    snap: Snapshot,
    now: datetime,
    *,
    threshold: Decimal | None,
    key_period: datetime,
    record: RequestRecord | None,
) -> Event:
    spec = state.spec
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": kind,
        "timestamp": format_ts(now),
        "budget": {
            "name": spec.name,
            "scope": spec.scope.describe(),
            "period": spec.period,
            "timezone": None if state.period.rolling else str(state.tz.key),
            "action": spec.action,
        },
        "period_start": format_ts(snap.period_start),
        "period_end": format_ts(snap.period_end),
        "spend_usd": snap.spend_usd,
        "limit_usd": snap.limit_usd,
        "percent": snap.percent,
        "threshold": threshold,
        "projection": {
            "projected_spend_usd": snap.projected_spend_usd,
            "projected_exceed_at": format_ts(snap.projected_exceed_at) if snap.projected_exceed_at else None,
        },
        "request": None
        if record is None
        else {"id": record.id, "model": record.model, "user": record.user, "cost_usd": record.cost_usd},
        # Not sent: the event's unique key in budget_events (see store.insert_events).
        "key_period_start": format_ts(key_period),
        "key_threshold": _threshold_text(threshold),
    }


def _slot(state: BudgetState, now: datetime) -> datetime:
    """The start of the window-length slot ``now`` falls in (rolling windows' event key)."""
    assert state.period.window is not None
    width = state.period.window.total_seconds()
    return datetime.fromtimestamp(now.timestamp() // width * width, UTC)


class AlertDetector:
    def __init__(self, tracker: SpendTracker, emit: Callable[[list[Event]], None]) -> None:
        self.tracker = tracker
        self._emit = emit

    # The writer thread, under the tracker lock (see SpendTracker.records_committed).
    def record_added(self, state: BudgetState, record: RequestRecord, now: datetime) -> None:
        state.advance(now)
        if state.total_pico < state.armed_pico and not state.spec.projected:
            return  # below every threshold not yet fired: nothing can cross (the common case)
        events = self._evaluate(state, now, record)
        if events:
            self._emit(events)

    def check_all(self, now: datetime) -> list[Event]:
        events: list[Event] = []
        with self.tracker.locked():
            for state in self.tracker.states_unlocked():
                events += self._evaluate(state, now, None)
        if events:
            self._emit(events)
        return events

    def _evaluate(self, state: BudgetState, now: datetime, record: RequestRecord | None) -> list[Event]:
        snap = state.snapshot(now)
        spec = state.spec
        events: list[Event] = []
        rolling = state.period.rolling
        if not rolling:
            if state.seen_period is not None and state.seen_period != snap.period_start and spec.notify_reset:
                events += self._fire(state, snap, now, "budget.reset", None, snap.period_start, None)
            state.seen_period = snap.period_start
        exact = snap.spend_usd * 100 / snap.limit_usd
        for threshold in spec.thresholds:
            kind = "budget.exceeded" if threshold == 100 else "budget.threshold_crossed"
            text = _threshold_text(threshold)
            if rolling:
                armed = not any(f[0] == kind and f[2] == text for f in state.fired)
                if exact >= threshold and armed:
                    events += self._fire(state, snap, now, kind, threshold, _slot(state, now), record)
                elif exact < threshold and not armed:
                    state.fired = {f for f in state.fired if not (f[0] == kind and f[2] == text)}
            elif exact >= threshold:
                events += self._fire(state, snap, now, kind, threshold, snap.period_start, record)
        unfired = [
            t
            for t in spec.thresholds
            if not any(
                f[0] == ("budget.exceeded" if t == 100 else "budget.threshold_crossed")
                and f[2] == _threshold_text(t)
                for f in state.fired
            )
        ]
        state.armed_pico = int((min(unfired) * snap.limit_usd / 100).scaleb(12)) if unfired else 1 << 126
        if (
            spec.projected
            and not rolling
            and snap.projected_spend_usd is not None
            and snap.projected_spend_usd > snap.limit_usd
            and not snap.exceeded
        ):
            events += self._fire(
                state, snap, now, "budget.projected_overrun", None, snap.period_start, record
            )
        return events

    @staticmethod
    def _fire(
        state: BudgetState,
        snap: Snapshot,
        now: datetime,
        kind: str,
        threshold: Decimal | None,
        key_period: datetime,
        record: RequestRecord | None,
    ) -> list[Event]:
        key = (kind, format_ts(key_period), _threshold_text(threshold))
        if key in state.fired:
            return []
        state.fired.add(key)
        return [
            build_event(kind, state, snap, now, threshold=threshold, key_period=key_period, record=record)
        ]

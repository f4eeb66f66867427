"""Reserve mode: hard budgets that hold under concurrency, in one process or across replicas.

A ``block`` budget refuses requests once its *recorded* spend reaches the
limit, so every request already in flight at that moment still completes:
with 50 concurrent requests a $1 budget can end at several dollars. A budget
with ``action = "reserve"`` admits a request only if its worst case fits:

    recorded spend + reservations still held + this request's worst case <= limit

**The worst case** (`worst_case`): the request's input is at most its body's
size in tokens (a tokenizer never makes more tokens than bytes of text), and
its output is at most what it asked for (``max_tokens``,
``max_completion_tokens``, ``max_output_tokens``, ``generationConfig.
maxOutputTokens``) or, when it asked for nothing, its model's own output limit
(`meterproxy.output_limits`: from 4k to 128k tokens), for a model that table does
not list ``budget_reserve_output_tokens`` (a setting), times
the answers it asks for (OpenAI ``n`` or ``best_of``, Gemini ``candidateCount``:
each answer may reach the limit and all are billed). Both
are priced with the requested model's current prices, without cache discounts.

**Requests without a worst case**: a model the tables do not price, or none
named (an Azure deployment path). Their answer may still name a priced model,
or carry the provider's own cost, which then counts as spend: reserving nothing
for them let many at once pass the limit. Each budget says what to do
(``unpriced``): ``refuse`` (the default: a hard limit refuses what it cannot
bound, with a 429 that names the model and this setting), ``reserve`` (hold
``unpriced_reserve_usd`` for each: the limit holds as long as that amount covers
one such request) or ``allow`` (hold nothing, as before: such requests are still
refused once spend and holds reach the limit, but those in flight can pass it).

**Reservations are rows** (``budget_reservations``: request id, budget,
amount, expiry) in the shared store, so every replica on one PostgreSQL
database sees every other's. Admission is one short transaction per request
in scope: ``BEGIN IMMEDIATE`` (SQLite's write lock; SERIALIZABLE on
PostgreSQL, where a concurrent admission that read the same rows fails and is
retried), then the spend, the held reservations and the insert. The spend is
read incrementally: the rows committed since the last admission (``rowid`` is
in commit order on both engines) are added to a per-budget running sum, so an
admission costs an index range, not a scan of the period.

**Settlement needs no write**: a reservation counts as held only while no
``requests`` row carries its request id (``NOT EXISTS``). The store writer's
commit of the record makes the real cost appear in the spend and the
reservation disappear from the held sum at the same instant, so nothing is
counted twice or not at all. Errors, disconnects and unpriced answers commit
a record too, which releases the reservation (with whatever the request
really cost). Garbage is swept later.

**Expiry**: a reservation is held until ``expires_at``; the owning process
pushes that forward every ``_REFRESH_S`` for the requests it still has in
flight. A process that crashes stops refreshing, and its reservations lapse
after ``_TTL_S``: the budget's headroom comes back, never lost.

Reserve budgets need a calendar period (day, week, month): a rolling window's
spend ages out continuously, which the running sum cannot follow.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from meterproxy.budgets.definition import period_bounds
from meterproxy.budgets.spend import BudgetState, in_scope
from meterproxy.budgets.store import scope_where
from meterproxy.money import from_pico, to_pico
from meterproxy.output_limits import output_limit
from meterproxy.pricing import PriceBook
from meterproxy.store import backend
from meterproxy.store.db import Db, Params
from meterproxy.timestamps import format_ts
from meterproxy.usage import RequestRecord, Usage

__all__ = ["Refusal", "ReservationLedger", "reserve_budgets", "worst_case"]

log = logging.getLogger(__name__)

_TTL_S = 120.0
_REFRESH_S = 30.0
_RETRIES = 50


def worst_case(record: RequestRecord, book: PriceBook, default_output: int, now: datetime) -> int | None:
    """The most this request can cost, in picodollars (None when its model has no price)."""
    provider = record.upstream or record.provider or None
    output = record.max_output_tokens
    if output is None:  # as much as the model can generate: its own limit, else the setting's
        output = output_limit(book, record.requested_model, provider) or default_output
    output *= max(record.output_choices, 1)  # n=4 generates (and bills) up to four answers
    usage = Usage(input_tokens=max(record.request_bytes, 1), output_tokens=output)
    result = book.price(
        model=record.requested_model,
        usage=usage,
        at=now,
        provider=provider,
        service_tier=record.service_tier,
    )
    return None if result is None else to_pico(result.cost_usd)


@dataclass(slots=True)
class Refusal:
    state: BudgetState
    spent_pico: int
    held_pico: int
    asked_pico: int
    #: Set when the request was refused for having no worst case (``unpriced = "refuse"``).
    unpriced: str | None = None

    def message(self) -> str:
        def usd(pico: int) -> Decimal:
            return from_pico(pico) or Decimal(0)

        spec = self.state.spec
        if self.unpriced is not None:
            return (
                f"meterproxy: budget '{spec.name}' is a hard limit and cannot bound this request: "
                f'{self.unpriced}. Price the model, or set unpriced = "reserve" (with '
                f'unpriced_reserve_usd) or "allow" on the budget'
            )
        return (
            f"meterproxy: budget '{spec.name}' cannot cover this request: ${usd(self.spent_pico)} spent "
            f"+ ${usd(self.held_pico)} reserved by requests in flight + up to ${usd(self.asked_pico)} for "
            f"this one would pass its ${spec.limit_usd} limit this {spec.period}"
        )


@dataclass(slots=True)
class _Running:
    """A budget's recorded spend this period, summed up to ``rowid``."""

    period_start: datetime
    rowid: int
    pico: int


def _retryable(conn: Db, exc: BaseException) -> bool:
    """PostgreSQL: a concurrent admission won (the store's own test); SQLite: the write lock stayed
    taken past the busy timeout."""
    return conn.is_serialization_failure(exc) or (conn.dialect.name == "sqlite" and "locked" in str(exc))


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


class ReservationLedger:
    """Admits, tracks and expires reservations; its database work runs on a thread of its own."""

    def __init__(
        self, db: str, book: Callable[[], PriceBook], default_output: int, clock: Callable[[], datetime]
    ) -> None:
        self._db = db
        self._book = book
        self._default_output = default_output
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meterproxy-reserve")
        self._conn: Db | None = None
        self._running: dict[str, _Running] = {}
        #: Reservations of this process's requests in flight: request id -> budgets.
        self._in_flight: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        #: Held picodollars per budget as last read (all replicas), for the API and metrics.
        self.held_pico: dict[str, int] = {}
        self.refused = 0

    # -- on the ledger's thread -----------------------------------------------------------
    def _connection(self) -> Db:
        if self._conn is None:
            self._conn = backend.connect(self._db)
        return self._conn

    def _spent(self, conn: Db, state: BudgetState, start: datetime) -> int:
        name = state.spec.name
        running = self._running.get(name)
        if running is None or running.period_start != start:
            running = _Running(start, 0, 0)
            self._running[name] = running
        p = Params(running.rowid, format_ts(start))
        where = scope_where(state.spec.scope, p, conn.dialect)
        row = conn.execute(
            f"SELECT COALESCE(SUM(cost_pico), 0), MAX(rowid) FROM requests "
            f"WHERE rowid > $1 AND ts >= $2 AND {where}",
            p.values,
        ).fetchone()
        # MAX(rowid) of the scoped rows only: unscoped rows in between are re-read next time
        # (cheaply: the range is by the primary key) and contribute nothing.
        if row[1] is not None:
            running.rowid = int(row[1])
            running.pico += int(row[0])
        return running.pico

    def _held(self, conn: Db, name: str, now: datetime) -> int:
        row = conn.execute(
            "SELECT COALESCE(SUM(r.amount_pico), 0) FROM budget_reservations r "
            "WHERE r.budget = $1 AND r.expires_at > $2 "
            "AND NOT EXISTS (SELECT 1 FROM requests q WHERE q.id = r.request_id)",
            [name, format_ts(now)],
        ).fetchone()
        return int(row[0])

    def _admit(self, record: RequestRecord, states: list[BudgetState], amounts: list[int]) -> Refusal | None:
        conn = self._connection()
        for attempt in range(_RETRIES):
            now = self._clock()
            saved = {n: _Running(r.period_start, r.rowid, r.pico) for n, r in self._running.items()}
            try:
                with conn.transaction():
                    refusal = self._check_and_insert(conn, record, states, amounts, now)
                    if refusal is not None:
                        raise _Refused(refusal)  # rolls the reads' transaction back
                return None
            except _Refused as refused:
                return refused.refusal
            except Exception as exc:
                self._running = saved  # the failed attempt's reads did not happen
                if not _retryable(conn, exc) or attempt == _RETRIES - 1:
                    raise
                time.sleep(min(0.001 * 2**attempt, 0.05))
        return None  # pragma: no cover - the loop returns or raises

    def _check_and_insert(
        self,
        conn: Db,
        record: RequestRecord,
        states: list[BudgetState],
        amounts: list[int],
        now: datetime,
    ) -> Refusal | None:
        expires = format_ts(now + timedelta(seconds=_TTL_S))
        for state, amount in zip(states, amounts, strict=True):
            start, _ = period_bounds(state.period, state.tz, now)
            spent = self._spent(conn, state, start)
            held = self._held(conn, state.spec.name, now)
            self.held_pico[state.spec.name] = held
            if spent + held + amount > state.limit_pico:
                return Refusal(state, spent, held, amount)
        for state, amount in zip(states, amounts, strict=True):
            conn.execute(
                "INSERT INTO budget_reservations (request_id, budget, amount_pico, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                [record.id, state.spec.name, amount, format_ts(now), expires],
            )
            self.held_pico[state.spec.name] = self.held_pico.get(state.spec.name, 0) + amount
        return None

    def _refresh(self) -> None:
        conn = self._connection()
        now = self._clock()
        with self._lock:
            ids = list(self._in_flight)
        expires = format_ts(now + timedelta(seconds=_TTL_S))
        for i in range(0, len(ids), 500):
            p = Params(expires)
            marks = p.many(ids[i : i + 500])
            conn.execute(
                f"UPDATE budget_reservations SET expires_at = $1 WHERE request_id IN ({marks})", p.values
            )
        # Sweep: lapsed reservations, and settled ones (their request is recorded).
        conn.execute(
            "DELETE FROM budget_reservations WHERE expires_at <= $1 "
            "OR EXISTS (SELECT 1 FROM requests q WHERE q.id = budget_reservations.request_id)",
            [format_ts(now)],
        )
        for name in list(self.held_pico):
            self.held_pico[name] = self._held(conn, name, now)

    # -- on the event loop ----------------------------------------------------------------
    async def admit(self, record: RequestRecord, states: list[BudgetState]) -> Refusal | None:
        """Reserve this request's worst case against every reserve budget in its scope."""
        now = self._clock()
        amount = worst_case(record, self._book(), self._default_output, now)
        if amount is None:
            why = (
                f"{record.requested_model!r} has no price" if record.requested_model else "it names no model"
            )
            for state in states:
                if state.spec.unpriced_policy == "refuse":
                    self.refused += 1
                    return Refusal(state, 0, 0, 0, unpriced=why)
            # Each budget's own policy: its fixed hold, or nothing ("allow": still refused once
            # spend and holds reach the limit, as `block` would).
            amounts = [
                to_pico(state.spec.unpriced_reserve_usd or Decimal(0))
                if state.spec.unpriced_policy == "reserve"
                else 0
                for state in states
            ]
            log.warning("reserve budgets: %s; request %s holds %s", why, record.id, amounts)
        else:
            amounts = [amount] * len(states)
        loop = asyncio.get_running_loop()
        refusal = await loop.run_in_executor(self._pool, self._admit, record, states, amounts)
        if refusal is None:
            with self._lock:
                self._in_flight[record.id] = [s.spec.name for s in states]
            # The largest hold (budgets hold the same worst case; unpriced ones their own amounts).
            record.extra["reserved_usd"] = str(from_pico(max(amounts, default=0)))
        else:
            self.refused += 1
        return refusal

    def finished(self, record: RequestRecord) -> None:
        """The meter's sink: the request is over; its reservation lasts until its record commits."""
        if not self._in_flight:  # none held (no reserve budget): reservations are made on this thread
            return
        with self._lock:
            self._in_flight.pop(record.id, None)

    def reserved_usd(self, name: str) -> Decimal:
        return from_pico(self.held_pico.get(name, 0)) or Decimal(0)

    async def refresh_held(self, names: list[str]) -> None:
        """Re-read the held sums of these budgets (all replicas), for the API."""
        if not names:
            return

        def read() -> None:
            conn = self._connection()
            now = self._clock()
            for name in names:
                self.held_pico[name] = self._held(conn, name, now)

        await asyncio.get_running_loop().run_in_executor(self._pool, read)

    async def refresh(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._refresh)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_S)
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing budget reservations failed")

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._pool.submit(shut)
        self._pool.shutdown(wait=True)


def reserve_budgets(states: list[BudgetState], record: RequestRecord) -> list[BudgetState]:
    """The reserve budgets whose scope covers this not-yet-forwarded request, by name."""
    return sorted(
        (
            s
            for s in states
            if s.spec.action == "reserve" and in_scope(s.spec.scope, record, before_forwarding=True)
        ),
        key=lambda s: s.spec.name,
    )

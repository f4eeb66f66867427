"""Budgets across replicas: every replica counts the spend all of them committed to the shared store.

A budget's spend lives in memory, per process (`meterproxy.budgets.spend`): it
is loaded from the database, then kept current by this process's own commits.
With several replicas on one PostgreSQL database each would otherwise see the
others' spend only at the next ``budget_resync_interval``. This module closes
that gap: every ``replica_poll_interval`` seconds (PostgreSQL only) it reads the
``requests`` rows committed since the last read, by rowid, and adds the ones
other processes wrote to every budget in scope, raising alerts exactly as a
local commit would. The block gate, the alerts and the spend gauges then all
follow the shared store, within one poll interval.

Why each row counts exactly once:

- rowids follow commit order across replicas (every insert into ``requests``
  takes ``Db.lock_request_order`` first), so "rowid above the last one read" misses no row that commits
  late;
- each budget load (at start, on resync, on create/update) also reads the
  highest rowid *in the same transaction* as the spend it loads (the engine's
  ``on_load`` hook);
  a row at or below that mark is already in the loaded spend and is skipped;
- rows this process wrote are counted by its own commit listener and skipped
  here (their ids are noted as they commit, on the same writer thread).

Reads run on the store writer's thread (``StoreWriter.call``), ordered with the
loads and the local commits; the rows are counted on the event loop once the
read's transaction is over, under the tracker's lock.

Overshoot bound for ``action = "block"``: a request is blocked once its replica
knows the spend has reached the limit. Requests already in flight anywhere when
the limit is reached complete (as with one process), and a replica that has
not yet read the crossing (at most ``replica_poll_interval`` plus one commit
batch, a few milliseconds) still admits requests. So a budget can end above its
limit by at most the cost of the requests in flight on all replicas when it was
reached plus those started in the following poll interval.

Webhooks go out once across replicas without anything here: an event is one
row (``UNIQUE (budget, type, period_start, threshold)``, inserted with
``ON CONFLICT DO NOTHING``; only the replica whose insert lands writes outbox rows),
and each delivery attempt is claimed by a conditional ``UPDATE`` that only one
replica's transaction can win.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from meterproxy.app_state import SETTINGS, WRITER
from meterproxy.budgets.feature import BUDGETS, BudgetEngine
from meterproxy.budgets.spend import BudgetState, in_scope
from meterproxy.money import to_pico
from meterproxy.store import backend
from meterproxy.store.db import Db
from meterproxy.store.writer import StoreWriter
from meterproxy.timestamps import parse_ts
from meterproxy.usage import RequestRecord

__all__ = ["ReplicaFollower", "setup"]

log = logging.getLogger(__name__)

_ROWS = (
    'SELECT rowid, id, ts, upstream, provider, requested_model, model, "user", key_fingerprint, tags, '
    "cost_usd FROM requests WHERE rowid > $1 ORDER BY rowid LIMIT $2"
)


def _max_rowid(conn: Db) -> int:
    return int(conn.execute("SELECT COALESCE(max(rowid), 0) FROM requests").fetchone()[0])


def _record(row: Any) -> RequestRecord:
    return RequestRecord(
        id=row[1],
        ts=parse_ts(str(row[2])),
        upstream=row[3] or "",
        provider=row[4] or "",
        requested_model=row[5],
        model=row[6],
        user=row[7],
        key_fingerprint=row[8],
        tags=json.loads(row[9]) if row[9] else {},
        cost_usd=None if row[10] is None else Decimal(row[10]),
    )


class ReplicaFollower:
    def __init__(self, engine: BudgetEngine, writer: StoreWriter, *, batch: int = 5_000) -> None:
        self.engine = engine
        self.writer = writer
        self.batch = batch
        #: Rows up to here have been read (or were there before this process followed).
        self.watermark = 0
        #: Budget name -> (the state a load installed, the highest rowid that load saw).
        self.marks: dict[str, tuple[BudgetState, int]] = {}
        #: Ids this process committed and the follower has not read back yet.
        self._own: set[str] = set()
        self.rows_counted = 0

    # -- installation (writer thread order: listener, watermark, reloads) --------
    async def start(self) -> None:
        self.writer.on_commit(self._committed)
        self.engine.on_load.append(self._loaded)
        self.watermark = await self._call(_max_rowid)
        await self.engine.resync()  # reload every budget, now with its mark

    def _committed(self, records: list[RequestRecord]) -> None:
        self._own.update(r.id for r in records)

    def _loaded(self, conn: Db, state: BudgetState) -> None:
        """A budget was (re)loaded: note the highest rowid its spend already includes."""
        self.marks[state.spec.name] = (state, _max_rowid(conn))

    # -- following -----------------------------------------------------------------
    async def _call(self, fn: Callable[[Db], Any]) -> Any:
        return await asyncio.shield(asyncio.wrap_future(self.writer.call(fn)))

    def read(self, conn: Db) -> list[Any]:
        """The next batch of committed rows above the watermark (on the writer thread)."""
        return list(conn.execute(_ROWS, [self.watermark, self.batch]).fetchall())

    def count(self, rows: list[Any]) -> None:
        """Add the rows other processes wrote to every budget in scope, raising alerts as they cross.

        Done after the read's transaction has ended (a retried transaction must not
        count twice); a load that ran in between already holds these rows and its
        mark says so.
        """
        engine, tracker = self.engine, self.engine.tracker
        now = engine.clock()
        with tracker.locked():
            for row in rows:
                rowid, rid = int(row[0]), row[1]
                if rid in self._own:
                    self._own.discard(rid)
                    continue
                if row[10] is None:
                    continue
                record = _record(row)
                assert record.cost_usd is not None
                pico, second = to_pico(record.cost_usd), int(record.ts.timestamp())
                for state in tracker.states_unlocked():
                    mark = self.marks.get(state.spec.name)
                    if mark is not None and mark[0] is state and rowid <= mark[1]:
                        continue  # already in the spend that load read
                    if not in_scope(state.spec.scope, record):
                        continue
                    if state.window_start is not None and record.ts < state.window_start:
                        continue
                    state.add(second, pico)
                    engine.detector.record_added(state, record, now)
                self.rows_counted += 1
        if rows:
            self.watermark = int(rows[-1][0])

    async def follow(self) -> int:
        """Read and count one batch; returns how many rows were read."""
        rows = await self._call(self.read)
        self.count(rows)
        return len(rows)

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                while await self.follow() == self.batch:
                    pass
                self.engine.publish_all()
            except Exception:
                log.exception("reading other replicas' rows failed; retrying")


async def _follow_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = app.get(BUDGETS)
    if engine is None or not backend.parse_db(settings.db).is_postgres:
        yield
        return
    follower = ReplicaFollower(engine, app[WRITER])
    await follower.start()
    task = asyncio.create_task(follower.run(settings.replica_poll_interval), name="meterproxy-replicas")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def setup(app: web.Application) -> None:
    """Register after ``meterproxy.budgets.feature`` (its engine must exist when this starts)."""
    app.cleanup_ctx.append(_follow_ctx)

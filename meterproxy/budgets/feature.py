"""Wiring: `setup(app)` adds the budgets engine, its gate, its routes and its background tasks.

`BudgetEngine` is the one object the API and the CLI talk to. Its lifecycle
(a ``cleanup_ctx``, after the store and the proxy exist):

1. **started**: every budget (config file first, then the ``budgets`` table) is
   loaded through the writer (`SpendTracker` explains why), the commit
   listener and the request gate are attached, and every budget is re-checked
   at once, so a crossing that happened while the proxy was down raises its
   event now.
2. **running**: each committed batch updates spend and may raise events;
   events go to the writer (event + outbox rows in one transaction) and wake
   the webhook `Deliverer`. A ticker re-checks every ``budget_check_interval``
   seconds (projections, rollovers, rolling windows, budgets another process
   added to the table) and re-reads all spend from the database every
   ``budget_resync_interval`` seconds (rows other processes wrote).
3. **stopped**: the gate is removed and the tasks are cancelled; deliveries
   not yet recorded stay ``pending`` in the outbox and go out after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from meterproxy.app_state import METER, METRICS, PRICEBOOK, READERS, SETTINGS, WRITER
from meterproxy.budgets.alerts import AlertDetector
from meterproxy.budgets.definition import BudgetSpec
from meterproxy.budgets.gate import make_gate
from meterproxy.budgets.reserve import ReservationLedger
from meterproxy.budgets.spend import BudgetState, SpendTracker
from meterproxy.budgets.store import (
    delete_budget,
    fired_events,
    insert_events,
    load_api_budgets,
    save_budget,
    spend_buckets,
)
from meterproxy.budgets.webhooks import Deliverer, RetryPolicy
from meterproxy.meter import Meter
from meterproxy.pricing import PriceBook
from meterproxy.settings import Settings
from meterproxy.store.backend import Readers
from meterproxy.store.writer import StoreWriter
from meterproxy.usage import RequestRecord, utcnow

__all__ = ["BUDGETS", "BUDGET_CLOCK", "BudgetEngine", "BudgetError", "setup"]

log = logging.getLogger(__name__)


class BudgetError(ValueError):
    """A budget change that cannot be made (``code`` is the API error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BudgetEngine:
    def __init__(
        self,
        settings: Settings,
        writer: StoreWriter,
        readers: Readers,
        clock: Callable[[], datetime],
        publish: Callable[[str, Decimal | None, Decimal | None], None] = lambda name, spend, limit: None,
        book: Callable[[], PriceBook] = PriceBook.default,
        publish_reserved: Callable[[str, Decimal], None] = lambda name, reserved: None,
    ) -> None:
        self._publish_reserved = publish_reserved
        self.settings = settings
        self._publish = publish
        self.writer = writer
        self.readers = readers
        self.clock = clock
        self.tracker = SpendTracker(settings.budget_timezone)
        self.detector = AlertDetector(self.tracker, self._emit)
        self.deliverer = Deliverer(
            writer=writer,
            readers=readers,
            endpoints=dict(settings.webhooks),
            policy=RetryPolicy(
                settings.webhook_retry_base, settings.webhook_retry_max, settings.webhook_give_up_after
            ),
            timeout_s=settings.webhook_timeout,
            clock=clock,
        )
        self.ledger = ReservationLedger(writer.path, book, settings.budget_reserve_output_tokens, clock)
        self.gate = make_gate(self.tracker, clock, self._blocked, self.ledger)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: The re-read of held sums after commits that settled this process's reservations.
        self._holds_reread: asyncio.Future[None] | None = None
        #: Commits settled holds while that re-read was in flight: it runs once more.
        self._holds_again = False
        self.events_raised = 0
        #: Set when attached to an app; blocked requests are recorded through it.
        self.meter: Meter | None = None
        #: Called on the writer thread after each budget load, in the load's transaction
        #: (``budgets/replicas.py`` notes how far into the table the load read).
        self.on_load: list[Callable[[Any, BudgetState], None]] = []

    # -- loading ------------------------------------------------------------
    async def _write(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.wrap_future(self.writer.call(fn))

    async def refresh_held(self, names: list[str]) -> None:
        """Re-read these reserve budgets' holds as of every request finished here, for the API.

        A finished request's record waits in the writer's queue for up to its linger
        (20 ms): until it commits, its cost is not in the spend and its hold still
        counts. A barrier on the writer (`StoreWriter.call` cuts the linger short)
        commits it first, so a view read right after the last answer shows the final
        spend and nothing held for it. Other replicas' records commit on their own.
        """
        if names:
            await self._write(lambda conn: None)
            await self.ledger.refresh_held(names)

    def _load_on_writer(self, conn: Any, spec: BudgetSpec, source: str) -> BudgetState:
        now = self.clock()
        state = self.tracker.new_state(spec, source)
        start, _ = state.advance(now)
        state.seen_period = None if state.period.rolling else start
        buckets = spend_buckets(conn, spec.scope, start)
        state.fired = set(fired_events(conn, spec.name, start))
        self.tracker.install(state, buckets)
        for hook in self.on_load:
            hook(conn, state)
        return state

    async def load(self, spec: BudgetSpec, source: str) -> BudgetState:
        state: BudgetState = await self._write(lambda conn: self._load_on_writer(conn, spec, source))
        return state

    async def create(self, spec: BudgetSpec) -> BudgetState:
        if self.tracker.get(spec.name) is not None:
            raise BudgetError("budget_exists", f"a budget named {spec.name!r} already exists")
        self._check_webhooks(spec)

        def work(conn: Any) -> BudgetState | None:
            if not save_budget(conn, spec, self.clock(), create=True):
                return None
            return self._load_on_writer(conn, spec, "api")

        state = await self._write(work)
        if state is None:
            raise BudgetError("budget_exists", f"a budget named {spec.name!r} already exists")
        self.check_now()
        return state  # type: ignore[no-any-return]

    async def update(self, spec: BudgetSpec) -> BudgetState:
        self._require_api(spec.name)
        self._check_webhooks(spec)

        def work(conn: Any) -> BudgetState:
            save_budget(conn, spec, self.clock(), create=False)
            return self._load_on_writer(conn, spec, "api")

        state: BudgetState = await self._write(work)
        self.check_now()
        return state

    async def delete(self, name: str) -> None:
        self._require_api(name)
        await self._write(lambda conn: delete_budget(conn, name))
        self.tracker.remove(name)
        self._publish(name, None, None)

    def _require_api(self, name: str) -> BudgetState:
        state = self.tracker.get(name)
        if state is None:
            raise BudgetError("not_found", f"no budget named {name!r}")
        if state.source != "api":
            raise BudgetError(
                "config_budget", f"budget {name!r} is defined in the config file; edit it there"
            )
        return state

    def _check_webhooks(self, spec: BudgetSpec) -> None:
        unknown = [w for w in spec.webhooks or [] if w not in self.settings.webhooks]
        if unknown:
            raise BudgetError("unknown_webhook", f"no webhook endpoint named {', '.join(unknown)}")

    async def sync_table(self) -> None:
        """Follow changes another process (``meterproxy budgets add --db``) made to the table.

        Read and applied in one call on the writer, where `create`, `update` and `delete` write
        the table too, so the table and the budgets in memory are compared at one moment. Read
        on a reader, a snapshot taken just before the API created a budget made the sync drop
        it (404, not enforced, until the next tick), and one taken before a delete brought the
        budget back.
        """

        def work(conn: Any) -> None:
            specs = {s.name: s for s in load_api_budgets(conn)}
            for state in self.tracker.states():
                if state.source == "api" and state.spec.name not in specs:
                    self.tracker.remove(state.spec.name)
            for name, spec in specs.items():
                current = self.tracker.get(name)
                if current is None or (current.source == "api" and current.spec != spec):
                    self._load_on_writer(conn, spec, "api")

        await self._write(work)

    def _blocked(self, record: RequestRecord) -> None:
        if self.meter is not None:
            self.meter.request_finished(record)

    # -- events --------------------------------------------------------------
    def records_committed(self, records: list[RequestRecord]) -> None:
        """The store writer's commit listener (runs on the writer thread)."""
        if self._closed:
            return
        now = self.clock()
        self.tracker.records_committed(records, lambda s, r: self.detector.record_added(s, r, now))
        self.publish_all()
        if any("reserved_usd" in r.extra for r in records):
            self._holds_settled()

    def _holds_settled(self) -> None:
        """Committed records released holds of this process: re-read the holds for the gauges.

        Between the ledger's refreshes (every 30 s) its held sums are those read at the
        last admission, which still count requests that have settled since: after a
        run the gauge kept showing them held. One re-read at a time, on the loop (this
        runs on the writer thread); commits that come while one is reading get one more
        after it, which may have read before them.
        """
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._holds_changed)
        except RuntimeError:  # the loop is closing
            pass

    def _holds_changed(self) -> None:
        if self._closed:
            return
        if self._holds_reread is not None:
            # Coalesced, not dropped: a re-read in flight may have read before this commit, and
            # without another one the gauge showed holds that had settled until the 30 s refresh
            # (seen at load 12, where a run's records commit in several batches).
            self._holds_again = True
            return
        self._holds_reread = asyncio.ensure_future(self._reread_holds())

    async def _reread_holds(self) -> None:
        try:
            again = True
            while again and not self._closed:
                self._holds_again = False
                names = [s.spec.name for s in self.tracker.states() if s.spec.action == "reserve"]
                try:
                    await self.ledger.refresh_held(names)
                except Exception:  # a side effect: never fails anything; the 30 s refresh catches up
                    log.exception("re-reading budget reservations failed")
                for name in names:
                    self._publish_reserved(name, self.ledger.reserved_usd(name))
                again = self._holds_again
        finally:
            self._holds_reread = None

    def publish_all(self) -> None:
        """Copy every budget's spend and limit to the metrics gauges (if metrics are on)."""
        now = self.clock()
        for state in self.tracker.states():
            snap = self.tracker.snapshot(state.spec.name, now)
            if snap is not None:
                self._publish(state.spec.name, snap.spend_usd, snap.limit_usd)
                if state.spec.action == "reserve":
                    self._publish_reserved(state.spec.name, self.ledger.reserved_usd(state.spec.name))

    def check_now(self) -> None:
        self.detector.check_all(self.clock())

    def _emit(self, events: list[dict[str, Any]]) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(self._persist, events)
        except RuntimeError:  # the loop is closing; the start-up re-check will raise them again
            log.warning("budget events dropped at shutdown (re-raised on next start)")

    def _persist(self, events: list[dict[str, Any]]) -> None:
        routes: dict[str, list[tuple[str, str]]] = {}
        for event in events:
            state = self.tracker.get(event["budget"]["name"])
            names = state.spec.webhooks if state and state.spec.webhooks is not None else None
            chosen = (
                self.settings.webhooks if names is None else {n: self.settings.webhooks[n] for n in names}
            )
            routes[event["id"]] = [(n, e.url) for n, e in chosen.items() if n in self.settings.webhooks]
            log.info("budget %s: %s", event["budget"]["name"], event["type"])
        future = self.writer.call(lambda conn: insert_events(conn, events, routes))
        future.add_done_callback(self._persisted)

    def _persisted(self, future: Any) -> None:
        if future.exception() is not None:
            log.error("could not record budget events: %s", future.exception())
            return
        self.events_raised += len(future.result())
        loop = self._loop
        if loop is not None and not self._closed:
            try:
                loop.call_soon_threadsafe(self.deliverer.wake)
            except RuntimeError:
                pass

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        seen: set[str] = set()
        for spec in self.settings.budgets:
            unknown = [w for w in spec.webhooks or [] if w not in self.settings.webhooks]
            if unknown:
                log.warning("budget %r names unknown webhook endpoints: %s", spec.name, ", ".join(unknown))
            await self.load(spec, "config")
            seen.add(spec.name)
        for spec in await self._write(load_api_budgets):
            if spec.name in seen:
                log.warning("budget %r is in the config file and the table; the config file wins", spec.name)
                continue
            await self.load(spec, "api")
        self.writer.on_commit(self.records_committed)
        self.check_now()
        self.publish_all()

    async def resync(self) -> None:
        """Re-read every budget's spend from the database.

        A process only sees its own commits as they happen; rows written by
        other processes on the same database (other workers, ``meterproxy
        import``) are counted from the next resync.
        """
        for name in self.tracker.names():
            # The definition is taken on the writer, at the load itself: one the API changed (or
            # deleted) while earlier budgets were being re-read is not loaded back as it was.
            def reload(conn: Any, name: str = name) -> None:
                state = self.tracker.get(name)
                if state is not None:
                    self._load_on_writer(conn, state.spec, state.source)

            await self._write(reload)

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.settings.budget_resync_interval
        while True:
            await asyncio.sleep(self.settings.budget_check_interval)
            try:
                self.check_now()
                await self.sync_table()
                if loop.time() >= next_resync:
                    next_resync = loop.time() + self.settings.budget_resync_interval
                    await self.resync()
                self.check_now()
                self.publish_all()
            except Exception:
                log.exception("budget check failed")

    def close(self) -> None:
        self._closed = True
        if self._holds_reread is not None:
            self._holds_reread.cancel()


BUDGETS: web.AppKey[BudgetEngine] = web.AppKey("budgets")
#: Tests may replace the budgets' clock before the app starts.
BUDGET_CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("budget_clock")


async def _budgets_ctx(app: web.Application) -> AsyncIterator[None]:
    def publish(name: str, spend: Decimal | None, limit: Decimal | None) -> None:
        metrics = app.get(METRICS)
        if metrics is None:
            return
        if spend is None:
            metrics.remove_budget(name)
        else:
            metrics.set_budget(name, spend, limit)

    def publish_reserved(name: str, reserved: Decimal) -> None:
        metrics = app.get(METRICS)
        if metrics is not None:
            metrics.set_budget_reserved(name, reserved)

    engine = BudgetEngine(
        app[SETTINGS],
        app[WRITER],
        app[READERS],
        app.get(BUDGET_CLOCK, utcnow),
        publish,
        book=lambda: app[PRICEBOOK],
        publish_reserved=publish_reserved,
    )
    app[BUDGETS] = engine
    await engine.start()
    meter = app[METER]
    engine.meter = meter
    tracker = engine.tracker
    meter.add_gate(engine.gate, idle=lambda: tracker.empty)  # the gate returns at once when empty
    meter.add_sink("reservations", engine.ledger.finished)
    # Before the store sink: a record counts as pending before it can possibly commit.
    meter.add_sink("budgets", engine.tracker.record_finished, before="store")
    tasks = [
        asyncio.create_task(engine.deliverer.run(), name="meterproxy-webhooks"),
        asyncio.create_task(engine.tick(), name="meterproxy-budget-ticker"),
        asyncio.create_task(engine.ledger.run(), name="meterproxy-budget-reservations"),
    ]
    yield
    engine.close()
    meter.remove_gate(engine.gate)
    meter.remove_sink("budgets")
    engine.deliverer.stop()
    tasks[1].cancel()
    tasks[2].cancel()
    _, late = await asyncio.wait(tasks, timeout=5.0)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    engine.ledger.close()


def setup(app: web.Application) -> None:
    # The routes are `meterproxy.budgets.api`'s own feature: it imports this module, not the reverse.
    app.cleanup_ctx.append(_budgets_ctx)

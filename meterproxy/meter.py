"""The meter: prices a finished request and fans the record out to the sinks.

This is the one moment every finished request passes through
(`Meter.request_finished`): by then the client already has its answer, so
nothing here may fail or delay it. Pricing is a pure function of the record;
then each sink (the store writer, the Prometheus metrics, budgets) gets the
record in registration order. A sink that raises is logged and skipped, never
allowed to lose the record for the others.

Hooks that must run *before* a request goes upstream (budget blocking) are
not here: see `Meter.request_gates`, consulted by the proxy before forwarding.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from aiohttp import web

from meterproxy.plausibility import flag_implausible, past_bound
from meterproxy.pricing import PriceBook
from meterproxy.usage import RequestRecord

__all__ = ["Gate", "Meter", "PriceFunction", "Sink", "price_list_of", "price_record_with"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    def __call__(self, record: RequestRecord) -> object: ...


#: Called before forwarding with the record as far as it is known (model, user, tags);
#: returns a response to send instead of forwarding (e.g. a budget's 429), or None.
Gate = Callable[[RequestRecord], Awaitable[web.StreamResponse | None]]


class PriceFunction(Protocol):
    def __call__(self, record: RequestRecord) -> None:
        """Set ``record.cost_usd`` and ``record.priced_model`` (None when unknown)."""


def _unpriced(record: RequestRecord) -> None:
    record.cost_usd = None


def price_list_of(record: RequestRecord, upstream_prices: Mapping[str, str]) -> str | None:
    """Whose price list bills `record`: the upstream's setting, else the upstream's own name.

    ``groq``, ``openrouter``, ``deepseek`` say who bills; the wire protocol does not
    (``openai`` for every compatible API), so it is only used for rows that came
    through no upstream: imports, whose ``upstream`` is the log they came from and
    whose ``provider`` is the one the agent's log (or its model) names.
    """
    if record.upstream and record.source == "proxy":
        return upstream_prices.get(record.upstream) or record.upstream
    return record.provider or None


def price_record_with(book: PriceBook, upstream_prices: Mapping[str, str] | None = None) -> PriceFunction:
    """Price records from ``book``: the answered model first, then the requested one.

    Only trusted usage is priced. A request without usage, or with a model the
    book does not know, keeps ``cost_usd=None``: never an invented zero.

    The price list is `price_list_of` the record: only that provider's list is
    searched. An upstream whose name names no price list and that has no
    ``prices`` setting (``local``, a custom name) prices nothing: its rows keep
    their tokens with a null cost (``/api/models/unpriced`` lists them), rather
    than a price from some other provider's list.
    """
    lists = dict(upstream_prices or {})
    # Whether the book has the price list a name names (the book does not change): a list it
    # lacks prices no model, so those records skip the model lookups.
    listed: dict[str, bool] = {}

    def price(record: RequestRecord) -> None:
        record.cost_usd = None
        record.priced_model = None
        record.cost_source = None
        # "partial": a stream cut before its final usage; priced as the lower bound it is.
        usage = record.usage
        if usage is None or record.usage_source not in ("reported", "partial"):
            return
        if past_bound(usage) and flag_implausible(record):  # its rule, without the calls first
            return
        plist = price_list_of(record, lists)
        if plist is not None:
            known = listed.get(plist)
            if known is None:
                if len(listed) >= 1024:
                    listed.clear()
                known = listed[plist] = book.price_list(plist) is not None
            if not known:
                plist = None
        # The answered model first, then the requested one (if another).
        model, requested = record.model, record.requested_model
        if not model:
            model, requested = requested, None
        elif requested == model:
            requested = None
        for name in (model, requested):
            if plist is None or not name:
                break
            result = book.price(
                model=name,
                usage=usage,
                at=record.ts,
                provider=plist,
                service_tier=record.service_tier,
            )
            if result is not None:
                record.cost_usd = result.cost_usd
                record.priced_model = result.model
                record.cost_source = "partial" if record.usage_source == "partial" else "computed"
                return
        # The tables cannot price it, but the answer carried its own cost (OpenRouter's
        # usage.cost): that figure, labelled as the provider's, rather than no cost at all.
        if record.provider_cost_usd is not None:
            record.cost_usd = record.provider_cost_usd
            record.cost_source = "provider"

    return price


class Meter:
    def __init__(self, price: PriceFunction = _unpriced) -> None:
        self._price = price
        self._sinks: list[tuple[str, Sink]] = []
        self.request_gates: list[Gate] = []
        #: Per gate that can tell: true while it lets every request through without a look.
        self._gate_idle: dict[Gate, Callable[[], bool]] = {}
        self.finished = 0

    def set_pricer(self, price: PriceFunction) -> None:
        self._price = price

    def add_sink(self, name: str, sink: Sink, *, before: str | None = None) -> None:
        """Add ``sink`` last, or just before the sink named ``before`` (if there is one)."""
        names = [n for n, _ in self._sinks]
        at = names.index(before) if before in names else len(self._sinks)
        self._sinks.insert(at, (name, sink))

    def remove_sink(self, name: str) -> None:
        self._sinks = [(n, s) for n, s in self._sinks if n != name]

    def request_finished(self, record: RequestRecord) -> None:
        try:
            self._price(record)
        except Exception:
            log.exception("pricing failed for %s", record.id)
            record.cost_usd = None
        self.finished += 1
        for name, sink in self._sinks:
            try:
                sink(record)
            except Exception:
                log.exception("sink %s failed for request %s", name, record.id)

    def add_gate(self, gate: Gate, idle: Callable[[], bool] | None = None) -> None:
        """Consult ``gate`` before forwarding; ``idle()`` true means it would pass anything now."""
        self.request_gates.append(gate)
        if idle is not None:
            self._gate_idle[gate] = idle

    def remove_gate(self, gate: Gate) -> None:
        if gate in self.request_gates:
            self.request_gates.remove(gate)
        self._gate_idle.pop(gate, None)

    def gates_idle(self) -> bool:
        """No gate would look at a request right now (none, or all idle): `check_gates` can be skipped.

        The lean server's callback relay forwards without a task only then; a gate
        that is not idle (a budget exists) is awaited in a task as before.
        """
        for gate in self.request_gates:
            idle = self._gate_idle.get(gate)
            if idle is None or not idle():
                return False
        return True

    async def check_gates(self, record: RequestRecord) -> web.StreamResponse | None:
        for gate in self.request_gates:
            try:
                response = await gate(record)
            except Exception:
                log.exception("request gate failed; forwarding anyway")
                continue
            if response is not None:
                return response
        return None

"""Costs in USD: the one conversion to and from picodollars, and the one way each is written as text.

A cost is an exact `Decimal`. It is stored twice from one computation (see
`meterproxy.store.schema`): ``cost_pico``, an integer number of 10^-12 USD that
SQL sums exactly, and ``cost_usd``, its text. Prices are per million tokens
with at most six decimals, so every cost is a whole number of picodollars;
anything finer is rounded half-even in `to_pico`, the one place precision is lost.

Text forms, one function each (two copies of these drifted once: the writer
wrote ``0.000000000000`` and reprice ``0E-12`` for the same zero):

- `stored_cost_text`: the ``cost_usd`` column, always twelve decimals.
- `usd_text`: for people and JSON exports, exact without trailing zeros
  (``0.0075``, ``2``, ``0``), optionally signed (``+0.5``).
- `usd_value`: the same canonical value as a Decimal, for JSON numbers.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import overload

__all__ = ["PICO", "from_pico", "pico_to_usd", "stored_cost_text", "to_pico", "usd_text", "usd_value"]

PICO = Decimal("1e-12")


def to_pico(cost: Decimal) -> int:
    """USD -> integer picodollars (half-even below a picodollar)."""
    return int(cost.quantize(PICO, rounding=ROUND_HALF_EVEN).scaleb(12))


@overload
def from_pico(value: int) -> Decimal: ...
@overload
def from_pico(value: None) -> None: ...
@overload
def from_pico(value: int | None) -> Decimal | None: ...
def from_pico(value: int | None) -> Decimal | None:
    """Integer picodollars -> USD (``None`` stays ``None``: unpriced)."""
    return None if value is None else Decimal(value).scaleb(-12)


def pico_to_usd(pico: int) -> Decimal:
    """Integer picodollars -> the shortest exact Decimal (``2.5``, ``0``): what the API answers."""
    return usd_value(from_pico(pico))


_EXACT_DIGITS = 10**28


def stored_cost_text(pico: int | None) -> str | None:
    """The ``cost_usd`` column's text: ``0.000123000000``, ``0.000000000000`` (never ``0E-12``)."""
    if pico is None:
        return None
    if not -_EXACT_DIGITS < pico < _EXACT_DIGITS:  # past the decimal context's 28 digits: its rounding
        return format(Decimal(pico).scaleb(-12), "f")
    # format(Decimal(pico).scaleb(-12), "f") in integer arithmetic: the same text at a tenth of
    # the cost (the writer makes one per stored row).
    units, fraction = divmod(-pico if pico < 0 else pico, 1_000_000_000_000)
    return f"{'-' if pico < 0 else ''}{units}.{fraction:012d}"


def usd_value(value: Decimal) -> Decimal:
    """Canonical digits: ``Decimal('2.500000000000')`` -> ``2.5``, ``1E+1`` -> ``10``, any zero -> ``0``."""
    if not value:
        return Decimal(0)
    value = value.normalize()
    return value.quantize(Decimal(1)) if value == value.to_integral() else value


def usd_text(value: Decimal, *, sign: bool = False) -> str:
    """Exact, no trailing zeros: ``0.0075``, ``2.67567``, ``10``, ``0``; ``sign`` adds ``+`` above 0."""
    text = format(usd_value(value), "f")
    return f"+{text}" if sign and value > 0 else text

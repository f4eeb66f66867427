"""Where a budget is heading, in one word, and its scope in words: shared by the CLI and (mirrored) the page.

A budget at 50 % whose projection for the period is five times its limit is
not "ok": `outlook` ranks the projection between a crossed threshold and an
exceeded limit, so ``meterproxy status`` and ``meterproxy budgets list`` colour it
as the page does (``dashboard/static/views.js`` ``budgetLevel``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

__all__ = ["OUTLOOK_RANK", "OUTLOOK_TEXT", "outlook", "scope_text"]

#: Worst last; the CLI colours green, yellow, yellow, red, red.
OUTLOOK_RANK = {"ok": 0, "warning": 1, "projected-over": 2, "exceeded": 3, "blocking": 3}
OUTLOOK_TEXT = {
    "ok": "on track",
    "warning": "past a threshold",
    "projected-over": "projected to overrun",
    "exceeded": "over the limit",
    "blocking": "over the limit, blocking",
}


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def outlook(view: dict[str, Any]) -> str:
    """``ok``, ``warning``, ``projected-over``, ``exceeded`` or ``blocking`` for an ``/api/budgets`` view."""
    state = str(view.get("state") or "ok")
    if state in ("exceeded", "blocking"):
        return state
    projected, limit = _decimal(view.get("projected_spend_usd")), _decimal(view.get("limit_usd"))
    if projected is not None and limit is not None and projected > limit:
        return "projected-over"
    return state if state in OUTLOOK_RANK else "ok"


def scope_text(scope: dict[str, Any] | None) -> str:
    """``user alice · tag team = data``; ``all requests`` for a global budget."""
    parts: list[str] = []
    for key, value in (scope or {}).items():
        if key == "tags" and isinstance(value, dict):
            parts += [f"tag {k} = {v}" for k, v in value.items()]
        elif value not in (None, "", {}):
            parts.append(f"{key} {value}")
    return " · ".join(parts) or "all requests"

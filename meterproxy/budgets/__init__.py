"""Budgets: spend limits over a scope and a period, alerts at thresholds, blocking at the limit.

The flow is one way, each module a stage:

- `definition` (pure): what a budget *is* (scope, period, limit, thresholds, action)
  and the calendar arithmetic for its periods; also what `Settings` imports.
- `spend`: the spend of every budget, loaded from the stored rows and kept up
  to date on the store writer's thread as each batch of priced records commits.
- `gate`: the request gate that answers a 429 in the provider's own error
  format instead of forwarding, when a ``block`` budget in scope is spent.
- `alerts`: threshold crossings and projections -> durable events (one per
  budget x type x threshold x period, enforced by a UNIQUE key).
- `webhooks` (``meterproxy.webhooks``): the outbox and its delivery task.
- `feature`: `BudgetEngine` and ``setup(app)``, which wires the stages above into
  the application.
- `api`: ``/api/budgets`` and ``/api/webhooks/deliveries`` over the engine (its
  own ``setup``, listed after `feature`'s).

This package's ``__init__`` stays import-light so that `meterproxy.settings`
can import `meterproxy.budgets.definition` without pulling in aiohttp handlers.
"""

from __future__ import annotations

__all__: list[str] = []

"""Facts about a few sessions at once: when they ran, who ran them and which models they used.

Read by the API's session list (for the one page it shows) and by
``meterproxy report session`` (for the rows it prints). Two small queries on
the ``(session, ts)`` index, whatever the number of sessions in the range:
the expensive part of a session list is the grouping, done once by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meterproxy.store.db import Db, Params
from meterproxy.store.queries import RequestFilter

__all__ = ["SessionFacts", "session_facts"]


@dataclass(slots=True)
class SessionFacts:
    first_ts: str = ""
    last_ts: str = ""
    users: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)


def session_facts(conn: Db, flt: RequestFilter, sessions: Sequence[str]) -> dict[str, SessionFacts]:
    """First and last request, users and models of each of `sessions`, within `flt`'s range and filters."""
    out = {s: SessionFacts() for s in sessions}
    if not sessions:
        return out
    p = Params()
    marks = p.many(sessions)
    where = flt.where(p, conn.dialect)
    args = p.values
    scope = f"FROM requests WHERE session IN ({marks}) AND {where}"
    for session, first, last in conn.execute(
        f"SELECT session, min(ts), max(ts) {scope} GROUP BY session", args
    ):
        out[session].first_ts, out[session].last_ts = first, last
    for session, user, model in conn.execute(f'SELECT DISTINCT session, "user", model {scope}', args):
        if user is not None:
            out[session].users.add(user)
        if model is not None:
            out[session].models.add(model)
    return out

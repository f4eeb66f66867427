"""The access log (``access_log = true``): one line per metered request, written by a meter sink.

A line carries what an operator needs to follow traffic and spend, and
nothing that could leak: status, method, upstream and endpoint, the model
(answered, else requested), tokens in/out, cost (exact USD, or ``unpriced``),
duration, and the request id that finds the stored row. Never a key (not even
its fingerprint), a user, a tag, a path with its query string, nor any
content. It is off by default: at ``info`` the proxy then logs only its start
and its stop, as before.

It runs as a meter sink, so a line appears once the request is finished and
priced, the same moment the store and the metrics see it; a sink that raises
is logged and skipped by the meter (it never fails a request).
"""

from __future__ import annotations

import logging

from meterproxy.money import usd_text
from meterproxy.usage import RequestRecord

__all__ = ["access_line", "log_request"]

log = logging.getLogger("meterproxy.access")


def access_line(record: RequestRecord) -> str:
    """``200 POST openai chat gpt-4o-mini in=12 out=34 cost=0.000123 812ms id=...``."""
    tokens = record.tokens
    cost = "unpriced" if record.cost_usd is None else usd_text(record.cost_usd)
    duration = "-" if record.duration_ms is None else f"{record.duration_ms:.0f}ms"
    return (
        f"{record.status if record.status is not None else '-'} {record.method} "
        f"{record.upstream or '-'} {record.endpoint or '-'} {record.model or record.requested_model or '-'} "
        f"in={tokens.input_tokens} out={tokens.output_tokens} cost={cost} {duration} id={record.id}"
    )


def log_request(record: RequestRecord) -> None:
    """The meter sink: one info line per finished request."""
    log.info("%s", access_line(record))

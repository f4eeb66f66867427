"""Requests aiohttp cannot parse: one WARNING per client per interval, every one counted.

When it fires: aiohttp's server answers ``400`` to bytes it cannot parse as an
HTTP request (bare-LF line endings, a control character in a header, an
over-long line) and logs the parse error on the ``aiohttp.server`` logger, at
ERROR with its traceback, once per request. By then the client has its 400 and
nothing was forwarded or recorded; only the log line is left to shape. Left as
is, one client looping bad requests writes a megabyte of log a second, and the
exception text quotes the raw line, credentials included.

`BadRequestLog` is a filter on that logger (installed for the app's lifetime by
`setup`): it counts each such record in ``meterproxy_bad_requests_total``, lets
at most one per client address through per ``interval`` (60 s), rewritten as a
one-line WARNING naming the client, the parse error's first line (redacted) and
how many were held back since the last line, with no traceback. Memory is
bounded: at most ``max_clients`` addresses are remembered (the oldest go first).

aiohttp logs one kind of bad request at DEBUG, not ERROR: a first request whose
method is not HTTP at all (TLS or another protocol sent to the plain port).
Those never reach a filter unless debug logging is on, so they are not counted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from meterproxy.app_state import METRICS
from meterproxy.logs import redact

__all__ = ["BAD_REQUESTS", "SERVER_LOGGER", "BadRequestLog", "setup"]

SERVER_LOGGER = "aiohttp.server"
_MESSAGE = "bad request from %s: %s (%d more from this client in the last %g s not logged)"
#: The app's limiter, for a server of our own to report its parse errors through.
BAD_REQUESTS: web.AppKey[BadRequestLog] = web.AppKey("bad_requests")


class BadRequestLog(logging.Filter):
    """Rate-limits and counts aiohttp's parse-error records; passes every other record untouched."""

    def __init__(
        self,
        count: Callable[[], None],
        *,
        interval: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._count = count
        self._interval = interval
        self._max_clients = max_clients
        self._clock = clock
        # client address -> [time of the last line let through, records held back since]
        self._clients: OrderedDict[str, list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        client = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "unknown"
        held_back = self._admit(client)
        if held_back is None:
            return False
        reason = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        record.msg, record.args = _MESSAGE, (client, redact(reason)[:200], held_back, self._interval)
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info, record.exc_text = None, None
        return True

    def report(self, client: str, reason: str) -> None:
        """The same for a server that parses requests itself (`meterproxy.server`)."""
        held_back = self._admit(client)
        if held_back is not None:
            logging.getLogger(SERVER_LOGGER).warning(
                _MESSAGE,
                client,
                redact(reason.strip().splitlines()[0] if reason.strip() else "?")[:200],
                held_back,
                self._interval,
            )

    def _admit(self, client: str) -> int | None:
        """Count one bad request; None if its line is held back, else how many were since the last."""
        self._count()
        now = self._clock()
        seen = self._clients.get(client)
        if seen is not None and now - seen[0] < self._interval:
            seen[1] += 1
            return None
        held_back = int(seen[1]) if seen is not None else 0
        self._clients[client] = [now, 0]
        self._clients.move_to_end(client)
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        return held_back


async def _installed(app: web.Application) -> AsyncIterator[None]:
    logger = logging.getLogger(SERVER_LOGGER)
    limiter = BadRequestLog(app[METRICS].bad_requests.inc)
    app[BAD_REQUESTS] = limiter
    logger.addFilter(limiter)
    yield
    logger.removeFilter(limiter)


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_installed)

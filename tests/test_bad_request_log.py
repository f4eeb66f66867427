"""Malformed requests: no key in the log (traceback text included), no log flood (issue 14.2, 14.8).

aiohttp logs a request it cannot parse at ERROR with the exception, whose text
quotes the raw bytes of the offending line: ``Authorization: Bearer <key>`` and
``?key=`` included. The log must carry neither, whatever part of the record
(message, arguments, exception text, traceback) they are in; and one client
sending bad requests in a loop must get one WARNING line per interval, no
traceback, every one of them counted in ``meterproxy_bad_requests_total``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from meterproxy.logs import configure_logging
from meterproxy.testing import FakeUpstream
from tests.helpers.served import Served
from tests.helpers.waits import WAIT_S

KEY = "3f9c1e7a0b2d4c68a1e5f7b9c0d2e4f6-shapeless"
GKEY = "AIzaSyD-SECRETgeminikey0123456789abcdef"

# Bare LF line endings (and a header line aiohttp refuses), with both kinds of credential.
BAD_REQUESTS = [
    (
        f"POST /v1/chat/completions?key={GKEY} HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\n"
        "Content-Length: 2\n\n{}"
    ).encode(),
    f"GET /v1/models?key={GKEY} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\x01\r\n\r\n".encode(),
    f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nBad Header: {KEY}\r\n\r\n".encode(),
]


async def _send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.slow
async def test_bad_requests_log_no_key_once_per_client_without_traceback_and_are_counted(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    proxy = Served(tmp_path / "m.db", upstream.url)
    try:
        await proxy.ready()
        rounds = 20
        for _ in range(rounds):
            for data in BAD_REQUESTS:
                answer = await _send_raw(proxy.port, data)
                assert answer.split(b" ", 2)[1] == b"400", answer[:80]
        total = len(BAD_REQUESTS) * rounds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (counted := await _metric(proxy.url, "meterproxy_bad_requests_total")) < total:
            assert loop.time() < deadline, f"counted {counted} of {total} bad requests"
            await asyncio.sleep(0.05)
        assert counted == total
        proxy.proc.terminate()
        await proxy.wait_exit()
    finally:
        proxy.stop()
    log = proxy.log.read_text()
    for secret in (KEY, GKEY, KEY[:16], GKEY[6:22]):
        assert secret not in log, "a credential reached the log"
    assert "Traceback" not in log
    assert " ERROR " not in log
    bad_lines = [line for line in log.splitlines() if "bad request" in line.lower()]
    assert 1 <= len(bad_lines) <= 2, bad_lines  # one client, one interval (plus the summary at most)
    assert all(" WARNING " in line for line in bad_lines)


def test_exception_text_and_traceback_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """Redaction covers the exception attached to a record, not only the message."""
    configure_logging("info")
    try:
        try:
            raise ValueError(f"bad line b'Authorization: Bearer {KEY}' in GET /x?key={GKEY}")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
        try:
            raise RuntimeError(f"x-api-key={KEY}")
        except RuntimeError as exc:
            logging.getLogger("meterproxy.proxy").error("failed", exc_info=exc)
        logging.getLogger("meterproxy").warning("here", stack_info=True, extra={"k": KEY})
        err = capsys.readouterr().err
        assert "[REDACTED]" in err and "Traceback" in err
        assert KEY not in err and GKEY not in err
    finally:
        logging.getLogger().handlers.clear()


def test_one_line_per_client_per_interval_and_bounded_memory() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from meterproxy.bad_requests import BadRequestLog

    now = [0.0]
    counted = []
    limiter = BadRequestLog(lambda: counted.append(1), interval=60, max_clients=3, clock=lambda: now[0])

    def bad(client: str) -> logging.LogRecord:
        exc = BadHttpMessage(f"Invalid header value char\n\n  b'Authorization: Bearer {KEY}'")
        return logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            (client,),
            (BadHttpMessage, exc, None),
        )

    passed = [limiter.filter(r) for r in (bad("a"), bad("a"), bad("b"), bad("a"))]
    assert passed == [True, False, True, False] and len(counted) == 4
    now[0] = 61.0
    record = bad("a")
    assert limiter.filter(record)
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "2 more" in record.getMessage() and KEY not in record.getMessage()
    for client in ("c", "d", "e"):
        limiter.filter(bad(client))
    assert len(limiter._clients) == 3  # the oldest addresses are forgotten first
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "other", (), None)
    assert limiter.filter(other) and other.levelno == logging.ERROR

"""Webhook delivery from the durable outbox: signed, retried, never in a request's way.

An event and its outbox rows (one per endpoint) are inserted in one
transaction (`store.insert_events`). From then on the outbox row is the
delivery's whole state, so nothing is lost on restart: the `Deliverer`
background task picks up every ``pending`` row whose ``next_attempt_at`` has
come, claims it through the writer (a lease: with several worker processes on
one database exactly one of them sends each attempt; a process that dies
mid-attempt leaves the row due again when the lease ends), POSTs it, and
records the attempt through the writer.

Guarantees (documented in the README):

- **At least once, idempotent by id.** Each delivery carries ``webhook-id`` =
  the event id, the same on every retry. A receiver that answered 2xx is not
  sent that event again; one that crashed before answering may see it again
  and should de-duplicate by ``webhook-id``.
- **Retries** on a non-2xx answer, a connection failure or a timeout, with
  exponential backoff (``webhook_retry_base`` doubling up to
  ``webhook_retry_max``) and jitter (each delay drawn from 50-100 % of that),
  until ``webhook_give_up_after`` seconds after the event (default 24 h) and
  at least one retry (``MIN_ATTEMPTS``); then the row is marked ``failed``. The
  retry floor matters after an outage of the proxy itself: an event older than
  the window gets one retry, not a single attempt that any blip would fail.
- **Never blocks a proxied request**: the request path only hands events to the
  writer queue; delivery runs in its own task with its own HTTP session.

Signing follows Standard Webhooks: ``webhook-signature: v1,<base64
HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`` with ``webhook-timestamp`` in
Unix seconds; the secret is base64 with or without the ``whsec_`` prefix,
decoded the way the reference library decodes it (`definition.signing_key`;
tests verify deliveries with ``standardwebhooks`` itself).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp

from meterproxy.budgets.definition import WebhookEndpoint, signing_key
from meterproxy.budgets.store import claim_due, record_attempt, release_claims
from meterproxy.exact_json import dumps
from meterproxy.store.backend import Readers
from meterproxy.store.db import Db
from meterproxy.store.queries import run_read
from meterproxy.store.writer import StoreWriter
from meterproxy.timestamps import format_ts, parse_ts

__all__ = ["Deliverer", "RetryPolicy", "sign", "slack_text", "verify"]

log = logging.getLogger(__name__)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """Check a delivery the way a receiver should (also the README's snippet, tested)."""
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance_s:
        return False
    expected = sign(secret, msg_id, int(ts), body).split(",", 1)[1]
    return any(
        hmac.compare_digest(expected, part.split(",", 1)[1])
        for part in headers["webhook-signature"].split()
        if part.startswith("v1,")
    )


def slack_text(event: dict[str, Any]) -> str:
    budget = event["budget"]["name"]
    spend, limit = event["spend_usd"], event["limit_usd"]
    kind = event["type"]
    if kind == "budget.exceeded":
        head = f"Budget *{budget}* reached its limit"
    elif kind == "budget.threshold_crossed":
        head = f"Budget *{budget}* crossed {event['threshold']}%"
    elif kind == "budget.projected_overrun":
        projected = event["projection"]["projected_spend_usd"]
        head = f"Budget *{budget}* is projected to overrun (${projected} by period end)"
    else:
        head = f"Budget *{budget}* starts a new period"
    return f"{head}: ${spend} of ${limit} ({event['percent']}%), period {event['period_start']}."


# A delivery is never marked failed on its first attempt alone (see the module docstring).
MIN_ATTEMPTS = 2


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 2.0
    max_s: float = 1800.0
    give_up_after_s: float = 86400.0

    def delay(self, attempts: int) -> float:
        """Delay after the ``attempts``-th failure: exponential, capped, jittered to 50-100 %."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** min(attempts - 1, 40))
        return ceiling * random.uniform(0.5, 1.0)


_DUE = """
SELECT o.id, o.event_id, o.endpoint, o.attempts, o.created_at, e.payload
FROM webhook_outbox o JOIN budget_events e ON e.id = o.event_id
WHERE o.state = 'pending' AND o.next_attempt_at <= $1
ORDER BY o.next_attempt_at LIMIT 200
"""


class Deliverer:
    def __init__(
        self,
        *,
        writer: StoreWriter,
        readers: Readers,
        endpoints: dict[str, WebhookEndpoint],
        policy: RetryPolicy,
        timeout_s: float,
        clock: Callable[[], datetime],
        concurrency: int = 16,
    ) -> None:
        self.writer = writer
        self.readers = readers
        self.endpoints = endpoints
        self.policy = policy
        self.clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # How long a claimed row stays ours: the attempt's timeout plus room to record it.
        self._lease = timedelta(seconds=timeout_s + 60)
        self._wake = asyncio.Event()
        self._stopping = False
        self._sending: set[int] = set()
        # Rows claimed whose attempt is not recorded yet -> the lease they hold (given back on stop).
        self._claims: dict[int, datetime] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed_attempts = 0

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask `run` to return (in-flight attempts are cancelled, stay pending and are due at once)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self._dispatch_due()
                    wait = await self._until_next()
                except Exception:
                    log.exception("webhook outbox scan failed; retrying")
                    wait = 1.0
                if self._stopping:
                    break
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()
            await self._release_claims()

    async def _release_claims(self) -> None:
        """A clean stop: the attempts cut short are due again now, not when their lease ends.

        The lease is for a process that dies mid-attempt; one that stops cleanly
        must not make the next process wait ``webhook_timeout`` + 60 s to retry.
        """
        claims, self._claims = self._claims, {}
        if not claims:
            return
        now = self.clock()
        try:
            released = await asyncio.wait_for(
                asyncio.wrap_future(self.writer.call(lambda c: release_claims(c, claims, now))), 5.0
            )
        except Exception as exc:  # the writer is failing: the leases end on their own
            log.warning("could not release %d webhook claim(s) at shutdown: %r", len(claims), exc)
            return
        log.info("released %d webhook claim(s) cut short by shutdown", released)

    async def _dispatch_due(self) -> None:
        now = self.clock()
        rows = await run_read(self.readers, lambda c: c.execute(_DUE, [format_ts(now)]).fetchall())
        rows = [r for r in rows if int(r[0]) not in self._sending]
        if not rows:
            return
        lease = now + self._lease
        ids = [int(r[0]) for r in rows]
        claimed = set(await asyncio.wrap_future(self.writer.call(lambda c: claim_due(c, ids, now, lease))))
        for row in rows:
            outbox_id = int(row[0])
            if outbox_id not in claimed:
                continue
            self._sending.add(outbox_id)
            self._claims[outbox_id] = lease
            task = asyncio.create_task(self._deliver(outbox_id, row[1], row[2], int(row[3]), row[4], row[5]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _until_next(self) -> float:
        def query(conn: Db) -> str | None:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE state = 'pending'"
            ).fetchone()
            return None if row is None else row[0]

        nxt = await run_read(self.readers, query)
        if nxt is None:
            return 5.0
        due = parse_ts(nxt)
        return max(0.02, min(5.0, (due - self.clock()).total_seconds()))

    async def _deliver(
        self, outbox_id: int, event_id: str, endpoint_name: str, attempts: int, created: str, payload: str
    ) -> None:
        try:
            async with self._slots:
                await self._attempt(outbox_id, event_id, endpoint_name, attempts, created, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook delivery %s crashed", outbox_id)
        finally:
            self._sending.discard(outbox_id)
            self._wake.set()

    async def _attempt(
        self, outbox_id: int, event_id: str, endpoint_name: str, attempts: int, created: str, payload: str
    ) -> None:
        assert self._session is not None
        endpoint = self.endpoints.get(endpoint_name)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        if endpoint is None:
            error = f"endpoint {endpoint_name!r} is no longer configured"
        else:
            body = self._body(payload, endpoint)
            try:
                async with self._session.post(
                    endpoint.url, data=body, headers=self._headers(event_id, body, endpoint)
                ) as response:
                    status = response.status
                    await response.read()
                if not 200 <= status < 300:
                    error = f"receiver answered {status}"
            except TimeoutError:
                error = "timed out"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        attempts += 1
        created_at = parse_ts(created)
        if error is None:
            state, nxt = "delivered", None
            self.delivered += 1
        elif endpoint is None or (
            attempts >= MIN_ATTEMPTS and (now - created_at).total_seconds() > self.policy.give_up_after_s
        ):
            state, nxt = "failed", None
            self.failed_attempts += 1
        else:
            state, nxt = "pending", now + timedelta(seconds=self.policy.delay(attempts))
            self.failed_attempts += 1
            log.warning("webhook %s to %s failed (%s); attempt %d", event_id, endpoint_name, error, attempts)
        duration = (time.perf_counter() - started) * 1000
        # The outcome is known: it must be recorded even if a clean stop cancels this task while
        # the write waits in the writer's queue (the claim is no longer ours to give back). The
        # wait is shielded: cancelling a bare `wrap_future` cancels the writer's future, and the
        # writer skips a cancelled call, which left the row pending under its lease.
        self._claims.pop(outbox_id, None)
        await _unless_cancelled(
            self.writer.call(
                lambda conn: record_attempt(
                    conn,
                    outbox_id,
                    at=now,
                    status=status,
                    error=error,
                    duration_ms=duration,
                    state=state,
                    next_attempt_at=nxt,
                )
            )
        )

    @staticmethod
    def _body(payload: str, endpoint: WebhookEndpoint) -> bytes:
        if endpoint.format == "slack":
            event = json.loads(payload, parse_float=Decimal)
            payload = dumps({"text": slack_text(event), **event})
        return payload.encode()

    def _headers(self, event_id: str, body: bytes, endpoint: WebhookEndpoint) -> dict[str, str]:
        timestamp = int(time.time())
        headers = {
            **endpoint.headers,
            "content-type": "application/json",
            "user-agent": "meterproxy-webhooks",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
        }
        if endpoint.secret:
            headers["webhook-signature"] = sign(endpoint.secret, event_id, timestamp, body)
        return headers


async def _unless_cancelled(future: Future[None]) -> None:
    """Wait for a writer call; if this task is cancelled meanwhile, the call still runs (and a
    failure of it is logged, as nobody is left to see it)."""
    waited = asyncio.wrap_future(future)
    try:
        await asyncio.shield(waited)
    except asyncio.CancelledError:
        waited.add_done_callback(_log_failure)
        raise


def _log_failure(waited: asyncio.Future[None]) -> None:
    if not waited.cancelled() and (exc := waited.exception()) is not None:
        log.error("recording a webhook attempt after shutdown began failed: %r", exc)

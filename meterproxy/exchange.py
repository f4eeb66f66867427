"""One request through the proxy as one object, and the client side it is answered on.

An `Exchange` is to meterproxy what mitmproxy's ``HTTPFlow`` is to mitmproxy:
everything the proxy knows about one request, from the moment it is routed to
the moment its record is finished, travels in it. The stages of `meterproxy.proxy`
take the exchange, never the same eight loose arguments.

`ClientSide` is the connection the answer goes back on. The proxy writes the
answer through it and never touches the server that received the request, so
the same forwarding code serves aiohttp's server (`meterproxy.proxy.AiohttpClient`)
and the lean protocol of `meterproxy.server`. Its contract:

- `respond` sends one whole answer of meterproxy's own (an error, a budget refusal);
- `start` sends the status line and headers of the upstream's answer (llhttp's
  bytes, as the upstream sent them), then
  `write` each piece of body and `end` once. A client that is gone makes `write`
  (and `start`) raise `ConnectionResetError`. `start` and `write` may hold
  their bytes back to send them with the next ones (a whole small answer in
  one system call instead of three); `flush` sends what is held, and the proxy
  calls it before it waits for more of the answer, so nothing is held while the
  upstream is silent;
- `abort` cuts the connection (the upstream broke off mid-answer: the client
  must be able to tell the answer is incomplete).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from meterproxy.providers.base import RequestInfo
from meterproxy.usage import RequestRecord

if TYPE_CHECKING:
    from aiohttp import web

    from meterproxy.providers import Provider
    from meterproxy.routing import Target
    from meterproxy.tap import ResponseTap
    from meterproxy.upstream import UpstreamResponse

__all__ = ["ClientNow", "ClientSide", "Exchange"]


class ClientSide(Protocol):
    """Where an exchange's answer goes (see the module docstring for the contract)."""

    async def respond(self, response: web.StreamResponse) -> None: ...

    async def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def flush(self) -> None: ...

    def abort(self) -> None: ...


class ClientNow(ClientSide, Protocol):
    """A `ClientSide` that can also take a whole answer without waiting (the lean server's).

    `ready` is true while the client is connected and its socket takes our writes
    (below the high-water mark); then `start_now`, `write_now` and `end_now` do
    what `start`, `write` and `end` do, holding or sending, never waiting and
    never raising. The proxy relays an answer that is all in memory this way,
    from a callback (`meterproxy.proxy.Proxy.relay_soon`), and only while `ready`:
    back-pressure is kept, because a client that stops reading is not `ready`
    and gets the waiting path instead.
    """

    def ready(self) -> bool: ...

    def start_now(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...

    def write_now(self, data: bytes) -> None: ...

    def end_now(self) -> None: ...


@dataclass(slots=True, eq=False)
class Exchange:
    """One request in flight: what was asked, where it goes, what came back, its record."""

    method: str
    target: Target
    provider: Provider | None
    info: RequestInfo
    record: RequestRecord
    #: The body as it goes upstream (after any usage injection).
    body: bytes
    #: The headers as they go upstream (hop-by-hop and our own ``X-Meter-*`` removed).
    headers: list[tuple[str, str]]
    #: The lean server's: the request's headers as llhttp parsed them (then ``headers`` is
    #: empty until needed as text), and the header lines that go upstream, as bytes.
    raw_headers: list[tuple[bytes, bytes]] | None = field(default=None, kw_only=True)
    wire: bytes | None = field(default=None, kw_only=True)
    #: perf_counter() when the request arrived, and when it was sent upstream.
    started: float
    sent_at: float = 0.0
    upstream: UpstreamResponse | None = None
    tap: ResponseTap | None = None
    #: The client hung up (or stopped reading) before the answer ended.
    client_gone: bool = False
    #: The record went to the meter already (durability="strict" finishes it before the last byte).
    recorded: bool = False
    #: Holds one of the proxy's bounded drain slots (the client left; reading on for usage).
    draining: bool = False

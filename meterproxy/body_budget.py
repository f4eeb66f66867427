"""A ceiling on the request-body bytes held in memory at once, across every request.

The proxy reads each request body whole (the model, stream flag and user are
in it), bounded per request by ``max_body_bytes`` (413 beyond). Per request is
not enough: 16 clients each sending a 31 MiB body took the process past 1 GB.
`BodyBudget` holds the total: a body's bytes are reserved as they are read
(all at once when ``Content-Length`` announces them, so nothing is read at all
when they cannot fit) and given back when its exchange is over (the body is
kept until the upstream has it and the exchange has finished). A request that
does not fit gets ``503`` with ``Retry-After`` (`OverBudget`), is recorded, and
is never forwarded.

So the memory that request bodies can take is ``max_buffered_body_bytes``
(default 256 MiB), plus aiohttp's read buffer of each connection whose body
has not been read yet (at most 128 KiB each; aiohttp stops reading a socket
past that).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

__all__ = ["RETRY_AFTER_SECONDS", "BodyBudget", "OverBudget", "read_body"]

#: What a client refused for lack of room is told to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 1


class OverBudget(Exception):
    """The body does not fit in what is left of the budget right now."""


class BodyBudget:
    """Bytes reserved by bodies in memory now, out of ``limit``."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> None:
        """Reserve ``n`` bytes, or raise `OverBudget` (nothing reserved then)."""
        if self.held + n > self.limit:
            raise OverBudget(
                f"the proxy is holding {self.held} bytes of request bodies, its limit is {self.limit}"
            )
        self.held += n

    def give_back(self, n: int) -> None:
        self.held -= n


async def read_body(
    request: web.Request, budget: BodyBudget, max_bytes: int, timeout: float
) -> tuple[bytes, int]:
    """The whole body and the bytes reserved for it (give them back when done with the body).

    Raises `OverBudget` (nothing held), ``web.HTTPRequestEntityTooLarge`` past
    ``max_bytes``, ``TimeoutError`` past ``timeout`` s, or the client's hang-up.
    """
    announced = request.content_length
    if announced is not None:
        if announced > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=announced)
        budget.take(announced)
        try:
            if request.content.is_eof():
                return await request.read(), announced  # all of it is here already (the usual case)
            async with asyncio.timeout(timeout):
                return await request.read(), announced
        except BaseException:
            budget.give_back(announced)
            raise
    # Chunked: the size is known only as the bytes arrive; reserve them as they do.
    parts: list[bytes] = []
    held = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                if held + len(chunk) > max_bytes:
                    raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=held + len(chunk))
                budget.take(len(chunk))
                held += len(chunk)
                parts.append(chunk)
    except BaseException:
        budget.give_back(held)
        raise
    return b"".join(parts), held

"""An upstream answering ``101 Switching Protocols`` to a plain HTTP request (issue 14.11).

meterproxy never asks an upstream to switch protocols (``Upgrade`` is
hop-by-hop and dropped; a client's WebSocket upgrade is answered by the proxy
itself). A 101 is therefore an upstream fault: the client gets a JSON ``502``
(not a 101 with nothing behind it), the request is recorded with the status
and the reason, and the connection is not reused.
"""

from __future__ import annotations

import json

from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawConnection
from tests.conftest import ProxyFactory
from tests.helpers.faults import CHAT, RawFactory, post, proxy_for, row_for, session_id, still_serving

SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"


async def test_unasked_101_is_a_recorded_502(
    upstream: FakeUpstream, make_proxy: ProxyFactory, raw_upstream: RawFactory
) -> None:
    async def script(conn: RawConnection) -> None:
        await conn.send(SWITCH)
        await conn.reader.read()

    raw = await raw_upstream(script)
    proxy = await proxy_for(make_proxy, raw, upstream)
    for fragment in (None, 1):
        sid = session_id()
        raw.script = script if fragment is None else _dribbled
        status, body, err, _ = await post(proxy, "/raw/v1/chat/completions", CHAT, session=sid)
        assert err is None and status == 502, (status, body)
        assert json.loads(body)["error"]["code"] == "upstream_switched_protocols"
        row = await row_for(proxy, sid)
        assert row["status"] == 502 and "101" in row["error"]
    await still_serving(proxy, upstream)


async def _dribbled(conn: RawConnection) -> None:
    await conn.send(SWITCH, chunk=1)
    await conn.reader.read()

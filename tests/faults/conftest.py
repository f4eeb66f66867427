"""Fault-suite fixtures: a raw-socket upstream next to the FakeUpstream (helpers: `tests.helpers.faults`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from meterproxy.testing_raw import RawUpstream, Script
from tests.helpers.faults import RawFactory


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    servers: list[RawUpstream] = []

    async def factory(script: Script | None = None, **kwargs: Any) -> RawUpstream:
        server = await RawUpstream(script, **kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()

"""Dot-segments in any spelling never pass below a base path (issue 14.11).

The README promises nothing climbs out of an upstream's base path. Plain and
singly encoded ``..`` were refused; these spellings were forwarded unchanged,
and some upstream stacks turn each of them into ``..``: a path parameter
(``..;`` for Tomcat and Spring), double encoding (``%252e%252e`` for a server
that decodes twice), overlong UTF-8 (``%c0%ae``), IIS's ``%u002e``, fullwidth
dots (NFKC). Each is refused with a 404 before anything is sent.
"""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from meterproxy.routing import RouteError, Upstream, route
from meterproxy.testing import FakeUpstream
from meterproxy.testing_raw import RawUpstream
from tests.conftest import ProxyFactory

UPSTREAMS = {"azure": Upstream("azure", URL("http://127.0.0.1:9/openai/deployments/prod"))}

SPELLINGS = [
    "..;",
    "..;jsessionid=x",
    ".;",
    "%2e%2e;",
    "%252e%252e",
    "%252E%252E",
    ".%252e",
    "%25252e%25252e",
    "%c0%ae%c0%ae",
    "%e0%80%ae%e0%80%ae",
    "%u002e%u002e",
    "%ef%bc%8e%ef%bc%8e",  # U+FF0E FULLWIDTH FULL STOP, twice
    "..%00",
    "%2e%2e%00",
    "..%09",
    " ..",
    ".. ",
]


@pytest.mark.parametrize("segment", SPELLINGS)
def test_every_spelling_of_a_dot_segment_is_refused(segment: str) -> None:
    with pytest.raises(RouteError, match="dot segment"):
        route(f"/azure/{segment}/other-deployment/chat/completions", "", UPSTREAMS)
    with pytest.raises(RouteError, match="dot segment"):
        route(f"/azure/chat/{segment}", "", UPSTREAMS)


@pytest.mark.parametrize("segment", ["...", "a..b", "..a", "v1.2", "%2e%2e%2e", ".well-known", "x;y"])
def test_names_that_only_look_like_dots_still_route(segment: str) -> None:
    target = route(f"/azure/{segment}/chat", "", UPSTREAMS)
    assert target.url.raw_path == f"/openai/deployments/prod/{segment}/chat"


async def test_through_the_proxy_nothing_is_sent(upstream: FakeUpstream, make_proxy: ProxyFactory) -> None:
    async with RawUpstream() as raw:
        azure = raw.url + "/openai/deployments/d"
        proxy = await make_proxy(upstreams={"openai": upstream.url, "azure": azure})
        async with aiohttp.ClientSession() as client:
            for segment in SPELLINGS:
                url = URL(f"{proxy.url}/azure/{segment}/x/chat/completions", encoded=True)
                async with client.post(url, data=b"{}") as r:
                    assert r.status in (400, 404), (segment, r.status)
        assert raw.connections == 0

"""Issue 15's coverage check: names real clients send, priced through a running proxy.

`tests/data/client_model_names.txt` lists about 380 names across OpenAI (legacy and
Azure spellings), Anthropic (Vertex and Bedrock ids), Gemini (previews), Mistral,
Groq, DeepSeek, xAI, OpenRouter, Together, Fireworks, Perplexity and Cohere, each
with the price list of the upstream a client would send it through. Every name
goes through a real meterproxy (official OpenAI SDK as the client) to a fake
upstream on 127.0.0.1 that answers with a real-shaped chat completion naming the
model; the stored rows are then compared with genai-prices, the independent oracle:
each priced row must equal it to 1e-9 or be a documented correction
(`KNOWN_DISAGREEMENTS` in test_pricing_genai.py, which also lists the targets of curated
redirects, under which such rows are priced).
"""

from __future__ import annotations

import asyncio
import json
import warnings
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from aiohttp import web

from meterproxy.pricing import PriceBook
from meterproxy.testing import FakeUpstream, load_fixture
from tests.conftest import ProxyFactory
from tests.helpers.sdk import SDK_TIMEOUT
from tests.test_pricing_genai import KNOWN_DISAGREEMENTS

genai_prices = pytest.importorskip("genai_prices")


def _names(file: str) -> list[tuple[str, str]]:
    lines = (Path(__file__).parent / "data" / file).read_text().splitlines()
    return [
        (p, m)
        for p, m in (line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
    ]


NAMES = _names("client_model_names.txt")
# A broader list (fine-tunes, Azure and Bedrock spellings, catalogue names) collected to find
# resolution gaps; its floor is lower because it holds more third-party catalogue models.
MORE_NAMES = _names("client_model_names_more.txt")
# A third list: SDK model literals and current catalogue ids neither list above has. Its floor
# is lower: the unpriced ones are SDK names no stored source prices (pricing/README.md, Coverage).
NAMES_2026 = _names("client_model_names_2026.txt")
# Our price list -> genai-prices provider id.
GENAI = {
    "gemini": "google",
    "vertex": "google",
    "bedrock": "aws",
    "xai": "x-ai",
}
MIN_PRICED = Decimal("0.98")
MIN_PRICED_MORE = Decimal("0.93")
MIN_PRICED_2026 = Decimal("0.95")
LISTS = sorted({plist for plist, _ in NAMES + MORE_NAMES + NAMES_2026})


def _answer_naming_the_model() -> web.Request:
    template = json.loads(load_fixture("openai_chat_json").body)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response({**template, "model": body["model"]})

    return handler  # type: ignore[return-value]


def _genai_cost(model: str, plist: str, row: dict[str, object]) -> Decimal | None:
    usage = genai_prices.Usage(
        input_tokens=row["input_tokens"],
        cache_read_tokens=row["cache_read_tokens"],
        output_tokens=row["output_tokens"],
        output_reasoning_tokens=row["reasoning_tokens"],
    )
    at = datetime.fromisoformat(str(row["ts"]).replace("Z", "+00:00"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = genai_prices.calc_price(
                usage, model, provider_id=GENAI.get(plist, plist), genai_request_timestamp=at
            )
    except LookupError:
        return None
    return Decimal(calc.total_price)


@pytest.fixture
def upstream_for_all(upstream: FakeUpstream) -> FakeUpstream:
    upstream.default = None
    upstream.replies["/v1/chat/completions"] = _answer_naming_the_model()  # type: ignore[assignment]
    return upstream


@pytest.mark.parametrize(
    ("names", "floor"),
    [(NAMES, MIN_PRICED), (MORE_NAMES, MIN_PRICED_MORE), (NAMES_2026, MIN_PRICED_2026)],
    ids=["main", "more", "2026"],
)
async def test_client_names_are_priced_through_the_proxy_and_agree_with_genai_prices(
    upstream_for_all: FakeUpstream, make_proxy: ProxyFactory, names: list[tuple[str, str]], floor: Decimal
) -> None:
    upstreams = {plist: upstream_for_all.url for plist in LISTS}
    proxy = await make_proxy(upstreams=upstreams)
    clients = {
        plist: openai.AsyncOpenAI(
            timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/{plist}/v1", api_key="sk-test-0000", max_retries=0
        )
        for plist in LISTS
    }
    order: list[tuple[str, str]] = []

    async def send(plist: str, model: str) -> None:
        await clients[plist].chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )

    for i in range(0, len(names), 16):
        batch = names[i : i + 16]
        await asyncio.gather(*(send(p, m) for p, m in batch))
        order += batch
    rows = await proxy.rows(len(names))
    assert len(rows) == len(names)
    by_request = {(r["upstream"], r["requested_model"]): r for r in rows}

    unpriced, wrong = [], []
    for plist, model in names:
        row = by_request[(plist, model)]
        if row["cost_usd"] is None:
            unpriced.append(f"{plist} {model}")
            continue
        ours = Decimal(row["cost_usd"])
        theirs = _genai_cost(model, plist, row)
        # A documented correction is listed under the priced table id (a redirect's target
        # included, such as grok-4.3), or under the requested name's own table id.
        alias = PriceBook.default().resolve(model, plist)
        documented = row["priced_model"] in KNOWN_DISAGREEMENTS or alias in KNOWN_DISAGREEMENTS
        if theirs is not None and abs(ours - theirs) > Decimal("1e-9") and not documented:
            wrong.append(f"{plist} {model}: ours {ours} ({row['priced_model']}) genai-prices {theirs}")
    priced = Decimal(len(names) - len(unpriced)) / len(names)
    assert not wrong, "\n".join(wrong)
    assert priced >= floor, f"{priced:.3f} priced; unpriced:\n" + "\n".join(unpriced)


async def test_an_upstream_is_priced_only_from_the_list_the_operator_chose(
    upstream_for_all: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    url = upstream_for_all.url
    proxy = await make_proxy(
        upstreams={"together": url, "tgt": f"{url}#prices=together", "local": url, "groq": url}
    )
    scout = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    for route in ("together", "tgt", "local", "groq"):
        client = openai.AsyncOpenAI(
            timeout=SDK_TIMEOUT, base_url=f"{proxy.url}/{route}/v1", api_key="sk-test-0000", max_retries=0
        )
        await client.chat.completions.create(model=scout, messages=[{"role": "user", "content": "hi"}])
    rows = {r["upstream"]: r for r in await proxy.rows(4)}
    # /together and an upstream that chose the together list: Together's price; /local: no list, no price.
    assert rows["together"]["cost_usd"] is not None
    assert rows["tgt"]["cost_usd"] == rows["together"]["cost_usd"]
    assert rows["local"]["cost_usd"] is None and rows["local"]["input_tokens"] == 1290
    # Groq serves the same model at its own, different price: never mixed up with Together's.
    assert rows["groq"]["cost_usd"] is not None
    assert Decimal(rows["groq"]["cost_usd"]) != Decimal(rows["together"]["cost_usd"])
    theirs = _genai_cost(scout, "together", rows["together"])
    assert theirs is not None and Decimal(rows["together"]["cost_usd"]) == theirs

"""Batch results metered on download at the batch tier, once however often they are downloaded."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx2
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from meterproxy.providers.batches import BatchResultsParser
from meterproxy.testing import Reply
from tests.helpers.sdk import SDK_TIMEOUT

FIXTURES = Path(__file__).parent / "fixtures" / "batches"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


async def test_openai_batch_output_file_metered_once_at_batch_prices(make_proxy, upstream) -> None:
    body = fixture("openai_batch_output.jsonl")
    upstream.reply(
        "/v1/files/file-out-1/content",
        Reply(body=body, content_type="application/octet-stream", chunk_size=1),
    )
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    for _ in range(2):  # downloaded twice
        content = await client.files.content("file-out-1")
        assert content.read() == body  # the client gets the file as it was
    await proxy.settle()
    rows = await proxy.rows()
    results = [r for r in rows if r["endpoint"] == "batch"]
    downloads = [r for r in rows if r["endpoint"] == "file_content"]
    assert len(downloads) == 2 and {d["usage_source"] for d in downloads} == {"none"}
    assert sorted((r["input_tokens"], r["output_tokens"]) for r in results) == [(20, 9), (22, 2)]
    for row in results:
        assert (row["service_tier"], row["model"], row["usage_source"]) == (
            "batch",
            "gpt-3.5-turbo-0125",
            "reported",
        )
        # gpt-3.5-turbo at half its $0.50 / $1.50 per million tokens.
        expected = (
            Decimal(row["input_tokens"]) * Decimal("0.25") + Decimal(row["output_tokens"]) * Decimal("0.75")
        ) / 10**6
        assert Decimal(row["cost_usd"]) == expected


async def test_anthropic_batch_results_metered_once(make_proxy, upstream) -> None:
    body = fixture("anthropic_batch_results.jsonl")
    path = "/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results"
    upstream.reply(path, Reply(body=body, content_type="application/binary", chunk_size=7))
    proxy = await make_proxy()
    client = AsyncAnthropic(timeout=SDK_TIMEOUT, api_key="sk-ant-x", base_url=f"{proxy.url}/anthropic")
    for _ in range(2):
        got = await client.get(path, cast_to=httpx2.Response)
        assert got.content == body
    await proxy.settle()
    rows = await proxy.rows()
    results = sorted((r for r in rows if r["endpoint"] == "batch"), key=lambda r: r["input_tokens"])
    assert [(r["input_tokens"], r["output_tokens"], r["usage_source"]) for r in results] == [
        (0, 0, "none"),  # the errored request: not billed
        (10, 34, "reported"),
        (11, 36, "reported"),
    ]
    assert "max_tokens" in results[0]["error"]
    billed = results[1:]
    assert {r["service_tier"] for r in billed} == {"batch"}
    # claude-3-5-sonnet at half its $3 / $15 per million tokens.
    assert (
        Decimal(billed[0]["cost_usd"])
        == (Decimal(10) * Decimal("1.5") + Decimal(34) * Decimal("7.5")) / 10**6
    )


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_results_are_read_line_by_line_whatever_the_split(step: int) -> None:
    body = fixture("openai_batch_output.jsonl")
    parser = BatchResultsParser("openai", "file-out-1")
    for i in range(0, len(body), step):
        parser.on_chunk(body[i : i + step])
    parser.on_body(b"", False)
    children = parser.result().children
    assert [key for key, _ in children] == ["file-out-1/batch_req_123", "file-out-1/batch_req_456"]
    assert [c.usage.total_tokens for _, c in children if c.usage] == [24, 29]


def test_a_file_that_holds_no_batch_results_is_a_plain_download() -> None:
    parser = BatchResultsParser("openai", "file-abc")
    parser.on_chunk(b'{"messages": [{"role": "user", "content": "fine-tune data"}]}\n')
    parser.on_body(b"", False)
    assert parser.result().children == [] and parser.result().usage_source == "none"

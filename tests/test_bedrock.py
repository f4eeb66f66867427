"""Amazon Bedrock through the proxy with boto3's own ``bedrock-runtime`` client.

The proxy re-signs each request (SigV4) with the operator's credentials; the fake
upstream checks that signature the way AWS would, then replays real Bedrock answers
(``tests/fixtures/bedrock``, event streams fed one byte at a time).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer

from meterproxy.providers.bedrock import BedrockParser, vendor_model
from tests.helpers.bedrock import (
    MODEL,
    OPERATOR,
    bedrock_upstream,
    body,
    client_for,
    operator_env,
)

#: The fixture, shared through tests/helpers/bedrock.py.
__all__ = ["operator_env"]


async def test_all_four_operations_resigned_and_metered(make_proxy, upstream, operator_env) -> None:
    seen = bedrock_upstream(
        upstream,
        {
            "converse": (body("converse"), "application/json", {}),
            "converse-stream": (body("converse_stream"), "application/vnd.amazon.eventstream", {}),
            "invoke": (
                body("invoke"),
                "application/json",
                {"X-Amzn-Bedrock-Input-Token-Count": "13", "X-Amzn-Bedrock-Output-Token-Count": "35"},
            ),
            "invoke-with-response-stream": (
                body("invoke_stream"),
                "application/vnd.amazon.eventstream",
                {"X-Amzn-Bedrock-Content-Type": "application/json"},
            ),
        },
    )
    proxy = await make_proxy(
        upstreams={"bedrock": upstream.url, "openai": upstream.url}, aws_sigv4={"bedrock": "us-east-1"}
    )
    client = client_for(proxy.url)
    messages = [{"role": "user", "content": [{"text": "Hello, how are you?"}]}]

    def calls() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["converse"] = client.converse(modelId=MODEL, messages=messages)
        stream = client.converse_stream(modelId=MODEL, messages=messages)
        out["converse_stream"] = [event for event in stream["stream"]]
        invoke_body = json.dumps(
            {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "Hi"}],
            }
        )
        out["invoke"] = json.loads(client.invoke_model(modelId=MODEL, body=invoke_body)["body"].read())
        stream = client.invoke_model_with_response_stream(modelId=MODEL, body=invoke_body)
        out["invoke_stream"] = [event for event in stream["body"]]
        return out

    got = await asyncio.to_thread(calls)
    # boto3 read every answer whole: the same usage it would have had from AWS.
    assert got["converse"]["usage"]["outputTokens"] == 100
    assert got["converse_stream"][-1]["metadata"]["usage"] == {
        "inputTokens": 13,
        "outputTokens": 35,
        "totalTokens": 48,
    }
    assert got["invoke"]["usage"] == {"input_tokens": 13, "output_tokens": 35}
    assert len(got["invoke_stream"]) == 3
    rows = await proxy.rows(4)
    by_endpoint = {r["endpoint"]: r for r in rows}
    expected = {
        "converse": (57, 100, 0),
        "converse_stream": (13, 35, 1),
        "invoke": (13, 35, 0),
        "invoke_stream": (12, 100, 1),
    }
    for endpoint, (tokens_in, tokens_out, streamed) in expected.items():
        row = by_endpoint[endpoint]
        assert (row["input_tokens"], row["output_tokens"], row["streamed"]) == (
            tokens_in,
            tokens_out,
            streamed,
        )
        assert row["provider"] == "bedrock" and row["usage_source"] == "reported", row
        assert row["requested_model"] == MODEL and row["model"] == "claude-3-5-sonnet-20240620"
        assert row["cost_usd"] is not None  # Claude 3.5 Sonnet, priced as the vendor lists it
    # Every request reached AWS signed by the operator, none with the client's signature.
    assert len(seen) == 4
    for request, _ in seen:
        assert "AKIDCLIENT" not in request.headers["authorization"]
        assert request.headers["x-amz-security-token"] == OPERATOR.token
    # The client's key is fingerprinted, never stored: its access key id, one fingerprint for
    # all four requests (not the signature, which differs in each), so per-key views hold.
    assert all(r["key_fingerprint"] for r in rows) and "AKIDCLIENT" not in json.dumps(rows)
    assert len({r["key_fingerprint"] for r in rows}) == 1


async def test_without_resigning_the_client_signature_is_forwarded_and_refused(
    make_proxy, upstream, operator_env
) -> None:
    bedrock_upstream(upstream, {"converse": (body("converse"), "application/json", {})})
    proxy = await make_proxy(upstreams={"bedrock": upstream.url, "openai": upstream.url})
    client = client_for(proxy.url)
    with pytest.raises(Exception) as refused:
        await asyncio.to_thread(
            client.converse, modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}]
        )
    assert "signature" in str(refused.value).lower()
    [row] = await proxy.rows(1)
    assert row["status"] == 403 and row["endpoint"] == "converse"


@pytest.mark.parametrize("name", ["converse_stream", "invoke_stream"])
def test_event_streams_whole_and_byte_by_byte(name: str) -> None:
    data = body(name)
    results = []
    for step in (len(data), 1, 7):
        parser = BedrockParser(
            name.replace("_", "-").replace("invoke-stream", "invoke-with-response-stream"), MODEL
        )
        parser.on_headers({"content-type": "application/vnd.amazon.eventstream"})
        for i in range(0, len(data), step):
            parser.on_chunk(data[i : i + step])
        parser.on_body(b"", False)
        result = parser.result()
        results.append((result.usage, result.usage_source, result.model))
    assert results[0] == results[1] == results[2]
    assert results[0][1] == "reported"


def test_a_cut_event_stream_is_partial_and_a_corrupt_one_is_flagged() -> None:
    data = body("invoke_stream")
    frames = EventStreamBuffer()
    frames.add_data(data)
    assert len(list(frames)) == 3  # the fixture's frames and CRCs are whole
    cut = BedrockParser("invoke-with-response-stream", MODEL)
    cut.on_headers({"content-type": "application/vnd.amazon.eventstream"})
    cut.on_chunk(data[: len(data) // 2])  # message_start read; the metrics never arrive
    assert cut.result().usage_source == "partial" and cut.result().usage.input_tokens == 12
    corrupt = BedrockParser("converse-stream", MODEL)
    corrupt.on_headers({"content-type": "application/vnd.amazon.eventstream"})
    corrupt.on_chunk(data[:20] + b"\x00" + data[21:])
    assert corrupt.result().usage is None and corrupt.result().notes


def test_vendor_model_names() -> None:
    assert vendor_model("us.anthropic.claude-3-7-sonnet-20250219-v1:0") == "claude-3-7-sonnet-20250219"
    assert vendor_model("anthropic.claude-3-5-sonnet-20240620-v1:0") == "claude-3-5-sonnet-20240620"
    assert vendor_model("amazon.nova-lite-v1:0") == "nova-lite"
    assert vendor_model("global.anthropic.claude-sonnet-4-5-20250929-v1:0") == "claude-sonnet-4-5-20250929"


async def test_a_budget_refusal_reaches_boto3_as_one_clear_error(make_proxy, upstream, operator_env) -> None:
    # AWS's error shape (x-amzn-ErrorType + "message") and Bedrock's quota status: boto3 raises
    # ServiceQuotaExceededException naming the budget, without retrying. Before, the OpenAI-shaped
    # 429 reached boto3 as "An error occurred (429) ...: " with no message, retried 4 times.
    import botocore.exceptions

    seen = bedrock_upstream(upstream, {"converse": (body("converse"), "application/json", {})})
    proxy = await make_proxy(
        upstreams={"bedrock": upstream.url},
        aws_sigv4={"bedrock": "us-east-1"},
        budgets=[{"name": "aws-team", "limit_usd": "0.000001", "period": "month", "action": "reserve"}],
    )
    client = client_for(proxy.url)

    def call() -> Any:
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
        return refused.value.response

    answer = await asyncio.to_thread(call)
    assert answer["Error"]["Code"] == "ServiceQuotaExceededException"
    assert "budget 'aws-team' cannot cover this request" in answer["Error"]["Message"]
    assert answer["ResponseMetadata"]["RetryAttempts"] == 0
    [row] = await proxy.rows(1)
    assert row["status"] == 429 and "aws-team" in row["error"] and not seen

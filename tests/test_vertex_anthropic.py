"""Claude on Vertex AI (``:rawPredict`` / ``:streamRawPredict``) through the proxy, with
anthropic's own ``AnthropicVertex`` client, and Anthropic's thinking-token count."""

from __future__ import annotations

import json

from anthropic import AnthropicVertex, AsyncAnthropicVertex

from meterproxy.providers.anthropic import AnthropicProvider, normalize_anthropic_usage
from meterproxy.testing import Reply, load_fixture
from tests.helpers.sdk import SDK_TIMEOUT

PREFIX = "/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models"


def vertex_client(proxy_url: str) -> AsyncAnthropicVertex:
    # An access token given outright: no Google credentials are looked up.
    return AsyncAnthropicVertex(
        timeout=SDK_TIMEOUT,
        project_id="my-proj",
        region="us-east5",
        access_token="ya29.test",
        base_url=f"{proxy_url}/vertex/v1",
    )


async def test_stream_raw_predict_is_metered_and_byte_identical(make_proxy, upstream) -> None:
    fixture = load_fixture("anthropic_messages_stream_delta_full_usage")
    path = f"{PREFIX}/claude-sonnet-4@20250514:streamRawPredict"
    upstream.reply(path, Reply(body=fixture.body, content_type=fixture.content_type, chunk_size=1))
    proxy = await make_proxy()
    client = vertex_client(proxy.url)
    async with client.messages.stream(
        model="claude-sonnet-4@20250514", max_tokens=4096, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_message()
    [row] = await proxy.rows(1)
    expect = fixture.expect
    assert (row["provider"], row["endpoint"], row["upstream"], row["streamed"]) == (
        "anthropic",
        "messages",
        "vertex",
        1,
    )
    assert row["requested_model"] == "claude-sonnet-4@20250514"
    assert row["model"] == expect["model"] and row["usage_source"] == "reported"
    assert (row["input_tokens"], row["output_tokens"]) == (expect["input_tokens"], expect["output_tokens"])
    assert final.usage.output_tokens == row["output_tokens"]
    assert row["cost_usd"] is not None
    sent = upstream.received[0]
    assert sent.path_qs.endswith(":streamRawPredict") and sent.headers["authorization"] == "Bearer ya29.test"
    body = json.loads(sent.body)
    assert "anthropic_version" in body and "model" not in body  # Vertex: the model is in the path


async def test_raw_predict_json_answer(make_proxy, upstream) -> None:
    fixture = load_fixture("anthropic_messages_json")
    upstream.reply(f"{PREFIX}/claude-sonnet-4-5@20250929:rawPredict", Reply(body=fixture.body))
    proxy = await make_proxy()
    message = await vertex_client(proxy.url).messages.create(
        model="claude-sonnet-4-5@20250929", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    [row] = await proxy.rows(1)
    assert row["requested_model"] == "claude-sonnet-4-5@20250929" and row["streamed"] == 0
    assert row["output_tokens"] == message.usage.output_tokens == fixture.expect["output_tokens"]
    assert row["usage_source"] == "reported" and row["cost_usd"] is not None


def test_vertex_paths_and_count_tokens() -> None:
    provider = AnthropicProvider()
    stream = f"{PREFIX}/claude-opus-4-1@20250805:streamRawPredict"
    count = f"{PREFIX}/count-tokens:rawPredict"
    assert provider.matches(stream) and provider.matches(count)
    assert not provider.matches("/v1/projects/p/locations/l/publishers/google/models/gemini:rawPredict")
    info = provider.inspect_request(stream, b'{"anthropic_version":"vertex-2023-10-16","max_tokens":5}')
    assert (info.model, info.stream) == ("claude-opus-4-1@20250805", True)
    assert provider.endpoint(count) == "count_tokens"
    parser = provider.new_parser(count, provider.inspect_request(count, b"{}"), False)
    parser.on_body(b'{"input_tokens": 12}', False)
    assert parser.result().usage_source == "none"


def test_thinking_tokens_are_reasoning_tokens_inside_output() -> None:
    usage = normalize_anthropic_usage(
        {"input_tokens": 10, "output_tokens": 300, "output_tokens_details": {"thinking_tokens": 220}}
    )
    assert (usage.output_tokens, usage.reasoning_tokens) == (300, 220)


def test_sync_client_type_is_the_same_sdk() -> None:
    # AnthropicVertex (sync) takes the same arguments: what README tells users to set.
    client = AnthropicVertex(
        timeout=SDK_TIMEOUT,
        project_id="p",
        region="us-east5",
        access_token="t",
        base_url="http://x/vertex/v1",
    )
    assert str(client.base_url).startswith("http://x/vertex/v1")

"""Every provider parser against byte-exact recorded answers, split every which way.

Each fixture's ``[expect]`` table holds the normalized usage a correct parser
must produce (see meterproxy/fixtures/wire/README.md).
"""

from __future__ import annotations

import pytest

from meterproxy.providers import ParseResult, ProviderRegistry, RequestInfo
from meterproxy.tap import ResponseTap
from meterproxy.testing import FIXTURES_DIR, Fixture, load_fixture

PROVIDERS = ProviderRegistry.builtin()

ALL = sorted(p.stem for p in FIXTURES_DIR.glob("*.toml"))
TOKEN_FIELDS = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
)


def run_tap(fx: Fixture, chunk: int | None, injected: bool = False) -> tuple[ParseResult, bytes]:
    path = str(fx.meta["path"]).split("?")[0]
    provider = PROVIDERS.detect(path)
    assert provider is not None, path
    assert provider.name == fx.meta["provider"]
    info = provider.inspect_request(path, str(fx.meta.get("request_body", "")).encode())
    tap = ResponseTap(
        provider.new_parser(path, info, injected),
        sse="event-stream" in fx.content_type,
        rewrite=injected,
    )
    body = fx.body
    pieces = [body] if chunk is None else [body[i : i + chunk] for i in range(0, len(body), chunk)]
    out = b"".join(tap.feed(p) for p in pieces) + tap.finish()
    return tap.result(), out


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("name", ALL)
def test_fixture_normalizes_to_expected_usage(name: str, chunk: int | None) -> None:
    fx = load_fixture(name)
    expect = fx.expect
    result, out = run_tap(fx, chunk)
    assert out == fx.body, "pass-through must forward every byte unchanged"
    assert result.usage_source == expect["usage_source"]
    assert result.model == expect["model"]
    if expect["usage_source"] in ("reported", "partial"):
        assert result.usage is not None
        for field in TOKEN_FIELDS:
            assert getattr(result.usage, field) == expect.get(field, 0), field
    else:
        assert result.usage is None
    assert bool(result.error) == bool(expect.get("error", False)), result.error
    if "provider_cost_usd" in expect:
        from decimal import Decimal

        assert result.provider_cost_usd == Decimal(str(expect["provider_cost_usd"]))


@pytest.mark.parametrize("chunk", [None, 1, 13])
def test_injected_usage_chunk_is_stripped_so_client_sees_the_unasked_stream(chunk: int | None) -> None:
    with_usage = load_fixture("openai_chat_stream_usage")
    without = load_fixture("openai_chat_stream_no_usage")
    result, out = run_tap(with_usage, chunk, injected=True)
    assert out == without.body
    assert result.usage is not None and result.usage.input_tokens == with_usage.expect["input_tokens"]


def test_prepare_request_inserts_include_usage_textually() -> None:
    provider = PROVIDERS.detect("/v1/chat/completions")
    assert provider is not None
    body = b'{"model": "gpt-4o",  "stream": true, "messages": [{"role":"user","content":"hi"}]}\n'
    info = provider.inspect_request("/v1/chat/completions", body)
    new, injected = provider.prepare_request("/v1/chat/completions", body, info)
    assert injected
    assert new == body.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'
    # Already asked: untouched.
    asked = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}'
    info = provider.inspect_request("/v1/chat/completions", asked)
    assert provider.prepare_request("/v1/chat/completions", asked, info) == (asked, False)
    # Not streaming: untouched.
    plain = b'{"model":"gpt-4o"}'
    info = provider.inspect_request("/v1/chat/completions", plain)
    assert provider.prepare_request("/v1/chat/completions", plain, info) == (plain, False)


def test_anthropic_delta_replaces_and_keeps_start_input() -> None:
    fx = load_fixture("anthropic_messages_stream")
    result, _ = run_tap(fx, 5)
    assert result.usage is not None
    # The delta carries only output_tokens: input side comes from message_start.
    assert result.usage.input_tokens == fx.expect["input_tokens"] > 0
    assert result.usage.output_tokens == fx.expect["output_tokens"]


@pytest.mark.parametrize(
    "usage, source",
    [
        ('{"prompt_tokens":-5,"completion_tokens":3}', "invalid"),
        ('{"prompt_tokens":"12","completion_tokens":3}', "invalid"),
        ('{"prompt_tokens":1e30,"completion_tokens":3}', "invalid"),
        ('{"prompt_tokens":true,"completion_tokens":3}', "invalid"),
        ('{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":9}}', "invalid"),
        ('{"prompt_tokens":5,"completion_tokens":3}', "reported"),
    ],
)
def test_bad_usage_numbers_are_flagged_not_counted(usage: str, source: str) -> None:
    provider = PROVIDERS.detect("/v1/chat/completions")
    assert provider is not None
    parser = provider.new_parser("/v1/chat/completions", RequestInfo(), False)
    parser.on_body(f'{{"model":"gpt-4o","usage":{usage}}}'.encode(), False)
    result = parser.result()
    assert result.usage_source == source
    assert (result.usage is None) == (source == "invalid")


def test_large_json_body_reads_usage_from_the_tail() -> None:
    from meterproxy import tap as tap_module

    provider = PROVIDERS.detect("/v1/embeddings")
    assert provider is not None
    vector = ",".join(["0.0123456"] * 1000)
    items = ",".join(f'{{"object":"embedding","index":{i},"embedding":[{vector}]}}' for i in range(1200))
    body = (
        f'{{"object":"list","data":[{items}],"model":"text-embedding-3-small",'
        f'"usage":{{"prompt_tokens":4321,"total_tokens":4321}}}}'
    ).encode()
    assert len(body) > tap_module.MAX_JSON_BYTES
    tap = ResponseTap(provider.new_parser("/v1/embeddings", RequestInfo(), False), sse=False)
    for i in range(0, len(body), 65536):
        tap.feed(body[i : i + 65536])
    tap.finish()
    result = tap.result()
    assert result.usage is not None and result.usage.input_tokens == 4321
    assert result.model == "text-embedding-3-small"


def test_gzip_answer_is_metered_and_forwarded_compressed() -> None:
    import gzip

    fx = load_fixture("openai_chat_json")
    compressed = gzip.compress(fx.body)
    provider = PROVIDERS.detect("/v1/chat/completions")
    assert provider is not None
    tap = ResponseTap(
        provider.new_parser("/v1/chat/completions", RequestInfo(), False),
        sse=False,
        content_encoding="gzip",
    )
    out = b"".join(tap.feed(compressed[i : i + 10]) for i in range(0, len(compressed), 10)) + tap.finish()
    assert out == compressed
    result = tap.result()
    assert result.usage is not None and result.usage.input_tokens == fx.expect["input_tokens"]

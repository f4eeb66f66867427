"""Images and audio endpoints through the proxy with the official openai SDK: usage metered.

Answer bodies are the OpenAI API reference's own examples (images: the ImagesResponse and
``image_generation.completed`` examples, whose usage is 50 in = 10 text + 40 image, 50 out;
transcription: the ``usage`` of type ``tokens`` example, 14 audio in, 45 out; speech with
``stream_format: "sse"``: ``speech.audio.done``), replayed whole and one byte at a time.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from openai import AsyncOpenAI

from meterproxy.providers.openai import OpenAIProvider
from meterproxy.testing import Reply
from tests.helpers.sdk import SDK_TIMEOUT

IMAGE_USAGE = (
    '{"total_tokens":100,"input_tokens":50,"output_tokens":50,'
    '"input_tokens_details":{"text_tokens":10,"image_tokens":40}}'
)
IMAGES_JSON = (
    '{"created":1713833628,"data":[{"b64_json":"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="}],'
    f'"usage":{IMAGE_USAGE}}}'
).encode()
IMAGES_SSE = (
    "event: image_generation.partial_image\n"
    'data: {"type":"image_generation.partial_image","b64_json":"iVBORw0KGgo=","created_at":1620000000,'
    '"size":"1024x1024","quality":"high","background":"transparent","output_format":"png","partial_image_index":0}\n\n'
    "event: image_generation.completed\n"
    'data: {"type":"image_generation.completed","b64_json":"iVBORw0KGgo=","created_at":1620000000,'
    f'"size":"1024x1024","quality":"high","background":"transparent","output_format":"png","usage":{IMAGE_USAGE}}}\n\n'
).encode()
TRANSCRIPTION_JSON = (
    b'{"text":"Imagine the wildest idea that you\'ve ever had, and you\'re curious about how it might scale '
    b'to something that\'s a 100, a 1,000 times bigger.","usage":{"type":"tokens","input_tokens":14,'
    b'"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":45,"total_tokens":59}}'
)
WHISPER_JSON = b'{"text":"Hello.","usage":{"type":"duration","seconds":3}}'
SPEECH_SSE = (
    b'data: {"type":"speech.audio.delta","audio":"UklGRiQAAABXQVZFZm10IBAAAAABAAEA"}\n\n'
    b'data: {"type":"speech.audio.done",'
    b'"usage":{"input_tokens":14,"output_tokens":101,"total_tokens":115}}\n\n'
)


@pytest.mark.parametrize("chunk", [None, 1])
async def test_image_generation_and_its_stream(make_proxy, upstream, chunk) -> None:
    upstream.reply("/v1/images/generations", Reply(body=IMAGES_JSON, chunk_size=chunk))
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    image = await client.images.generate(model="gpt-image-1", prompt="A cute baby sea otter")
    assert image.usage is not None and image.usage.input_tokens == 50
    upstream.reply(
        "/v1/images/generations", Reply(body=IMAGES_SSE, content_type="text/event-stream", chunk_size=chunk)
    )
    events = [e async for e in await client.images.generate(model="gpt-image-1", prompt="otter", stream=True)]
    assert events[-1].type == "image_generation.completed"
    rows = await proxy.rows(2)
    for row in rows:
        assert (row["endpoint"], row["requested_model"], row["usage_source"]) == (
            "images",
            "gpt-image-1",
            "reported",
        )
        assert (row["input_tokens"], row["output_tokens"]) == (50, 50)
        details = json.loads(row["extra"])["usage_details"]
        assert details == {"input_text_tokens": 10, "input_image_tokens": 40}
        # gpt-image-1: 10 text in x $5 + 40 image in x $10 + 50 image out x $40 per million.
        assert Decimal(row["cost_usd"]) == Decimal("0.00245")
        assert (row["image_input_tokens"], row["image_output_tokens"]) == (40, 50)
    assert [r["streamed"] for r in rows] == [0, 1]


async def test_image_edit_multipart_names_its_model(make_proxy, upstream) -> None:
    upstream.reply("/v1/images/edits", Reply(body=IMAGES_JSON, chunk_size=1))
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    await client.images.edit(model="gpt-image-1", image=("otter.png", png, "image/png"), prompt="add a hat")
    [row] = await proxy.rows(1)
    assert (row["endpoint"], row["requested_model"]) == ("image_edits", "gpt-image-1")
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (50, 50, "reported")
    assert upstream.received[0].body.startswith(b"--")  # the form went upstream as sent


async def test_transcription_tokens_and_whisper_duration(make_proxy, upstream) -> None:
    upstream.reply("/v1/audio/transcriptions", Reply(body=TRANSCRIPTION_JSON, chunk_size=1))
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    audio = ("speech.wav", b"RIFF" + bytes(40), "audio/wav")
    result = await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
    assert result.text.startswith("Imagine")
    upstream.reply("/v1/audio/transcriptions", Reply(body=WHISPER_JSON))
    await client.audio.transcriptions.create(model="whisper-1", file=audio)
    first, second = await proxy.rows(2)
    assert (first["endpoint"], first["requested_model"]) == ("transcriptions", "gpt-4o-transcribe")
    assert (first["input_tokens"], first["output_tokens"], first["usage_source"]) == (14, 45, "reported")
    assert json.loads(first["extra"])["usage_details"] == {"input_audio_tokens": 14}
    # gpt-4o-transcribe: 14 audio in x $6 + 45 text out x $10 per million.
    assert Decimal(first["cost_usd"]) == Decimal("0.000534")
    assert second["usage_source"] == "none" and second["cost_usd"] is None
    assert "billed by duration: 3 s" in json.loads(second["extra"])["notes"]


async def test_speech_as_server_sent_events(make_proxy, upstream) -> None:
    upstream.reply("/v1/audio/speech", Reply(body=SPEECH_SSE, content_type="text/event-stream", chunk_size=1))
    proxy = await make_proxy()
    client = AsyncOpenAI(timeout=SDK_TIMEOUT, api_key="sk-x", base_url=f"{proxy.url}/v1")
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello", stream_format="sse"
    ) as response:
        got = await response.read()
    assert got == SPEECH_SSE
    [row] = await proxy.rows(1)
    assert (row["endpoint"], row["requested_model"], row["streamed"]) == ("speech", "gpt-4o-mini-tts", 1)
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (14, 101, "reported")
    # gpt-4o-mini-tts: 14 text in x $0.60 + 101 audio out x $12 per million.
    assert Decimal(row["cost_usd"]) == Decimal("0.0012204")


def test_multipart_fields_are_read_without_touching_the_file() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\nnot-this\r\n\r\n'
        b'--b\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n--b--\r\n'
    )
    info = OpenAIProvider().inspect_request("/v1/audio/transcriptions", body)
    assert (info.model, info.stream) == ("gpt-4o-transcribe", True)

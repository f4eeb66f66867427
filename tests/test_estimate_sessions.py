"""estimate_usage for answers that are not HTTP bodies: WebSocket responses and Bedrock event streams.

A Realtime or Responses-over-WebSocket response cut by the socket closing, a Gemini
Live turn that never reported usage, and a Bedrock ConverseStream that ends before its
``metadata`` event end without usage just like an HTTP stream cut mid-way: with
``estimate_usage`` on they get the same labelled estimate (``cost_source =
"estimated"``, ``cost_usd`` NULL, tokens in ``extra.estimate``), counted from the text
the proxy relayed. Audio is never counted as text. The tokenizer here is the fallback
heuristic, so the expected counts are plain arithmetic on the texts.
"""

from __future__ import annotations

import asyncio
import json
import struct
from decimal import Decimal
from typing import Any

import websockets
from aiohttp import WSMsgType, web

from meterproxy.estimate import HEURISTIC, eventstream_text, load_tokenizer
from meterproxy.testing import FakeUpstream
from tests.conftest import ProxyFactory
from tests.helpers.bedrock import MODEL, OPERATOR, body, client_for, operator_env, signature_ok
from tests.helpers.ws import messages, ws_upstream, ws_url

__all__ = ["operator_env"]  # the fixture, shared with test_bedrock
COUNT = load_tokenizer(None).count
AUDIO = "QUFB" * 4000  # base64 audio: 16 KB that must never count as text


def _estimated(row: dict[str, Any]) -> dict[str, Any]:
    assert row["usage_source"] == "missing" and row["cost_source"] == "estimated", row
    assert row["cost_usd"] is None and row["input_tokens"] == 0 and row["output_tokens"] == 0
    assert row["estimated_cost_usd"] is not None and Decimal(row["estimated_cost_usd"]) > 0
    estimate: dict[str, Any] = json.loads(row["extra"])["estimate"]
    assert estimate["method"] == HEURISTIC
    return estimate


async def test_a_realtime_response_cut_by_the_socket_is_estimated_from_its_text(
    make_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    # The first response finishes with usage (never estimated); the second is cut when the
    # upstream closes: its text deltas (not its audio) and the client's text are counted.
    events = messages("openai_realtime")
    deltas = ["Paris is ", "the capital", " of France."]

    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.send_str(events[0])
        responses = 0
        async for msg in ws:
            if msg.type != WSMsgType.TEXT or json.loads(msg.data)["type"] != "response.create":
                continue
            responses += 1
            if responses == 1:
                for event in events[1:9]:
                    await ws.send_str(event)
                continue
            await ws.send_str(json.dumps({"type": "response.created", "response": {"id": "resp_2"}}))
            for text in deltas:
                delta = {
                    "type": "response.output_audio_transcript.delta",
                    "response_id": "resp_2",
                    "delta": text,
                }
                await ws.send_str(json.dumps(delta))
                audio = {"type": "response.output_audio.delta", "response_id": "resp_2", "delta": AUDIO}
                await ws.send_str(json.dumps(audio))
            return  # the upstream goes away mid-response

    ws_upstream(upstream, "/v1/realtime", serve)
    proxy = await make_proxy(estimate_usage=True)
    instructions = "Answer in one short sentence."
    question = "What is the capital of France?"
    async with websockets.connect(
        f"{ws_url(proxy.url)}/v1/realtime?model=gpt-realtime",
        additional_headers={"Authorization": "Bearer sk-rt"},
        max_size=None,
    ) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": instructions}}))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO}))
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await ws.send(json.dumps({"type": "response.create"}))
        async for text in ws:
            if json.loads(text)["type"] == "response.done":
                break
        await ws.send(json.dumps({"type": "response.create"}))
        async for _ in ws:  # until the upstream's close reaches us
            pass
    first, second = await proxy.rows(2)
    assert first["cost_source"] == "computed" and first["estimated_cost_usd"] is None
    assert "closed before the response finished" in second["error"] and second["status"] == 101
    estimate = _estimated(second)
    assert estimate["output_tokens"] == COUNT("".join(deltas))
    assert estimate["input_tokens"] == COUNT(f"{instructions}\n{question}")
    assert estimate["priced_model"] and second["model"] == first["model"]


async def test_a_responses_socket_cut_mid_answer_is_estimated(
    make_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    deltas = ["Look left, ", "then right, ", "then left again."]

    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        async for msg in ws:
            if json.loads(msg.data)["type"] == "response.create":
                created = {
                    "type": "response.created",
                    "response": {"id": "r1", "model": "o3-mini-2025-01-31"},
                }
                await ws.send_str(json.dumps(created))
                for text in deltas:
                    await ws.send_str(json.dumps({"type": "response.output_text.delta", "delta": text}))
                return

    ws_upstream(upstream, "/v1/responses", serve)
    proxy = await make_proxy(estimate_usage=True)
    create = {
        "type": "response.create",
        "model": "o3-mini",
        "instructions": "Be careful.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "How do I cross a street?"}]}],
    }
    async with websockets.connect(
        f"{ws_url(proxy.url)}/v1/responses", additional_headers={"Authorization": "Bearer sk-codex"}
    ) as ws:
        await ws.send(json.dumps(create))
        async for _ in ws:
            pass
    [row] = await proxy.rows(1)
    estimate = _estimated(row)
    assert row["model"] == "o3-mini"
    assert estimate["output_tokens"] == COUNT("".join(deltas))
    assert estimate["input_tokens"] == COUNT("Be careful.\nHow do I cross a street?")


async def test_a_gemini_live_turn_without_usage_is_estimated(
    make_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    parts = ["Hello there. ", "How can I help?"]

    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        await ws.receive_str()  # setup
        await ws.send_bytes(b'{"setupComplete": {}}')
        await ws.receive_str()  # the user's turn
        for text in parts:
            content = {"serverContent": {"modelTurn": {"parts": [{"text": text}]}}}
            await ws.send_bytes(json.dumps(content).encode())
        # closed before turnComplete and before any usageMetadata

    ws_upstream(upstream, path, serve)
    proxy = await make_proxy(estimate_usage=True)
    async with websockets.connect(f"{ws_url(proxy.url)}/gemini{path}?key=gk-live") as ws:
        setup = {"model": "models/gemini-2.0-flash", "systemInstruction": {"parts": [{"text": "Be kind."}]}}
        await ws.send(json.dumps({"setup": setup}))
        await ws.recv()
        turn = {"turns": [{"role": "user", "parts": [{"text": "Hi!"}]}], "turnComplete": True}
        await ws.send(json.dumps({"clientContent": turn}))
        await ws.send(json.dumps({"realtimeInput": {"audio": {"data": AUDIO, "mimeType": "audio/pcm"}}}))
        async for _ in ws:
            pass
    [row] = await proxy.rows(1)
    estimate = _estimated(row)
    assert row["model"] == "gemini-2.0-flash"
    assert estimate["output_tokens"] == COUNT("".join(parts))
    assert estimate["input_tokens"] == COUNT("Be kind.\nHi!")


async def test_estimates_off_a_cut_realtime_response_stays_unestimated(
    make_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    async def serve(ws: web.WebSocketResponse, request: web.Request) -> None:
        async for _msg in ws:
            await ws.send_str(json.dumps({"type": "response.created", "response": {"id": "r"}}))
            await ws.send_str(json.dumps({"type": "response.output_text.delta", "delta": "Hi"}))
            return

    ws_upstream(upstream, "/v1/realtime", serve)
    proxy = await make_proxy()
    async with websockets.connect(f"{ws_url(proxy.url)}/v1/realtime?model=gpt-realtime") as ws:
        await ws.send(json.dumps({"type": "response.create"}))
        async for _ in ws:
            pass
    [row] = await proxy.rows(1)
    assert row["cost_source"] is None and row["estimated_cost_usd"] is None
    assert "estimate" not in json.loads(row["extra"])


def _frames(data: bytes) -> list[bytes]:
    """An AWS event stream's frames, each whole (its first 4 bytes are its length)."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        out.append(data[:length])
        data = data[length:]
    return out


async def test_a_bedrock_stream_that_ends_without_usage_is_estimated(
    make_proxy: ProxyFactory, upstream: FakeUpstream, operator_env: None
) -> None:
    # ConverseStream's usage is in its last event (metadata); this stream ends without it.
    frames = _frames(body("converse_stream"))
    assert b"metadata" in frames[-1]
    relayed = b"".join(frames[:-1])
    text = eventstream_text(relayed)
    assert text.startswith("Hello! As an AI") and text.endswith("How can I help you today?")

    async def handle(request: web.Request) -> web.StreamResponse:
        payload = await request.read()
        assert signature_ok(request, payload, OPERATOR)
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await response.prepare(request)
        for frame in frames[:-1]:
            await response.write(frame)
        await response.write_eof()
        return response

    upstream.replies[f"/model/{MODEL}/converse-stream"] = handle
    proxy = await make_proxy(
        upstreams={"bedrock": upstream.url}, aws_sigv4={"bedrock": "us-east-1"}, estimate_usage=True
    )
    client = client_for(proxy.url)
    prompt = "Hello, how are you?"

    def call() -> list[Any]:
        stream = client.converse_stream(
            modelId=MODEL,
            messages=[{"role": "user", "content": [{"text": prompt}]}],
            system=[{"text": "Be brief."}],
        )
        return list(stream["stream"])

    events = await asyncio.to_thread(call)
    assert not any("metadata" in e for e in events)
    [row] = await proxy.rows(1)
    assert row["model"] == "claude-3-5-sonnet-20240620"
    estimate = _estimated(row)
    assert estimate["output_tokens"] == COUNT(text)
    assert estimate["input_tokens"] == COUNT(f"{prompt}\nBe brief.")


def test_eventstream_text_reads_invoke_stream_chunks_and_stops_at_a_cut_frame() -> None:
    data = body("invoke_stream")
    # Claude's message_start / message_delta carry no text; the fixture has none to count.
    assert eventstream_text(data) == ""
    frames = _frames(body("converse_stream"))
    whole = eventstream_text(b"".join(frames))
    cut = eventstream_text(b"".join(frames[:5]) + frames[5][:-3])
    assert whole.startswith(cut) and cut == "Hello! As an AI language model, I don"

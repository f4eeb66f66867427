"""Token estimates for answers that came without usage (``estimate_usage``, off by default).

Some answers never report usage: a stream whose client did not ask for it
(where meterproxy does not inject ``include_usage``), an upstream that died
mid-answer, a client that hung up before the last event. Their rows have no
tokens and no cost. With ``estimate_usage = true`` meterproxy counts the tokens
itself: the request's prompt text (messages, system, instructions, input,
contents, tool definitions) and the answer text it relayed (content deltas,
tool-call arguments, reasoning text), and prices them as the meter would.

**An estimate is never spend.** The row keeps ``cost_usd = NULL`` and its
tokens at 0; the estimate goes to ``estimated_cost_pico`` and to
``extra.estimate`` (tokens, method, priced model), and ``cost_source`` says
``estimated``. Summaries, reports and the page show estimated requests and
their cost apart from reported spend (``estimated_requests``,
``estimated_cost_usd``); budgets, metrics and OpenTelemetry see reported
spend only.

**Tokenizers** (`load_tokenizer`): ``estimate_tokenizer_file`` names a local
tiktoken encoding file (``o200k_base.tiktoken``, GPT-4o and later;
``cl100k_base.tiktoken``, GPT-4 and 3.5), optionally gzipped; which encoding it
is, is read from its SHA-256 (the hashes tiktoken itself checks), so a corrupt
or unknown file stops start-up rather than counting wrongly. tiktoken downloads
its files at run time, which closed networks refuse; a file copied once (from
tiktoken's cache, or from a package that ships one) works offline. Without a
file the **fallback heuristic** counts one token per 4 bytes of UTF-8 text
(``heuristic:utf8_bytes/4``: about right for English, low for code and for
languages outside Latin script). Every estimate names its method. Other
providers' models are counted with the same encoding: estimates, labelled so.

**Where it runs**: on the store writer's thread, just before the row is
written (`Estimator.prepare`), never on the event loop (20 KB of text take a
few milliseconds to tokenize; tiktoken releases the GIL meanwhile). The text is
what the tap kept of the answer (``estimate_max_bytes``, the first bytes of
each answer while it is in flight) and the request body, both dropped once the
row is written: neither is ever stored. Per-message framing tokens are not
counted.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson
from botocore.eventstream import EventStreamBuffer, ParserError

from meterproxy.meter import PriceFunction
from meterproxy.sse import SSEDecoder
from meterproxy.usage import WS_MESSAGES, Estimate, EstimateSource, RequestRecord, Usage

__all__ = [
    "HEURISTIC",
    "Estimator",
    "Tokenizer",
    "answer_text",
    "check_tokenizer_file",
    "eventstream_text",
    "load_tokenizer",
    "prompt_text",
    "ws_frame",
    "ws_prompt_text",
]

log = logging.getLogger(__name__)

#: The label of the fallback heuristic.
HEURISTIC = "heuristic:utf8_bytes/4"


class Tokenizer(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class _Heuristic:
    name = HEURISTIC

    def count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8", errors="replace")) / 4)


class _Tiktoken:
    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding
        self.name = f"tiktoken:{encoding.name}"

    def count(self, text: str) -> int:
        # encode_ordinary: special-token text in a prompt is plain text to the provider too.
        return len(self._encoding.encode_ordinary(text))


# tiktoken's public encodings, by the SHA-256 tiktoken checks their files against; patterns
# and special tokens as tiktoken_ext/openai_public.py defines them (tiktoken 0.14).
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": (
        "o200k_base",
        _O200K_PATTERN,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": (
        "cl100k_base",
        _CL100K_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


def _identify(file: str) -> tuple[bytes, tuple[str, str, dict[str, int]]]:
    """An encoding file's ranks text and which encoding it is (ValueError, worded for the operator)."""
    try:
        data = Path(file).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ValueError(
            f"estimate_tokenizer_file {file!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    known = _ENCODINGS.get(hashlib.sha256(data).hexdigest())
    if known is None:
        raise ValueError(
            f"estimate_tokenizer_file {file!r} is neither o200k_base.tiktoken nor cl100k_base.tiktoken "
            "(its SHA-256 matches neither): a corrupt copy, or another encoding"
        )
    if importlib.util.find_spec("tiktoken") is None:
        raise ValueError("estimate_tokenizer_file needs tiktoken: pip install 'meterproxy[estimate]'")
    return data, known


def check_tokenizer_file(file: str | None) -> None:
    """At start-up: ValueError unless `load_tokenizer` will accept ``file`` (cheap: no ranks built)."""
    if file:
        _identify(file)


def load_tokenizer(file: str | None) -> Tokenizer:
    """The tokenizer of an encoding file (ValueError if unusable), or the heuristic without one."""
    if not file:
        return _Heuristic()
    data, (name, pattern, special) = _identify(file)
    import tiktoken  # type: ignore[import-not-found,unused-ignore]  # meterproxy[estimate]: see _identify

    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return _Tiktoken(encoding)


# -- the text of a request and of an answer ---------------------------------------------------

#: Top-level request fields that hold what the model reads, across the wire families.
_PROMPT_FIELDS = (
    "messages",
    "system",
    "instructions",
    "input",
    "prompt",
    "contents",
    "systemInstruction",
    "system_instruction",
    "tools",
    "toolConfig",  # Bedrock Converse
    "inputText",  # Bedrock InvokeModel, Amazon Titan
)
#: Keys whose values are no prompt text: structure, ids, and binary payloads (base64 images
#: and audio would count as thousands of "tokens" the provider bills differently, if at all).
_NOT_TEXT = frozenset(
    {
        "role",
        "type",
        "id",
        "tool_call_id",
        "call_id",
        "cache_control",
        "mime_type",
        "mimeType",
        "data",
        "image_url",
        "url",
        "file_id",
        "file_data",
        "inline_data",
        "inlineData",
        "source",
        "detail",
        "audio",  # Realtime input_audio content parts: base64
    }
)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _NOT_TEXT:
                yield from _strings(item)


def prompt_text(body: bytes) -> str:
    """The text the model reads from a request body (JSON), or "" when it is not JSON."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(doc, dict):
        return ""
    return "\n".join(_prompt_parts(doc))


def _prompt_parts(doc: dict[str, Any]) -> Iterator[str]:
    for name in _PROMPT_FIELDS:
        if name not in doc:
            continue
        if name in ("tools", "toolConfig"):
            # Tool definitions are billed as prompt: their JSON text is what the model reads.
            yield orjson.dumps(doc[name]).decode()
        else:
            yield from _strings(doc[name])


#: What a WebSocket client's message holds for the model, by dialect: Realtime's
#: ``session.update`` (instructions, tools), ``conversation.item.create`` (``item``) and
#: ``response.create`` (``response``: instructions, input); Gemini Live's ``setup``
#: (systemInstruction, tools), ``clientContent`` (``turns``) and ``realtimeInput`` text.
#: Responses over WebSocket sends the HTTP body's own fields at the top level.
_WS_NESTED = ("session", "response", "setup")


def ws_frame(payload: bytes) -> bytes:
    """One WebSocket JSON message as one SSE event, for `EstimateSource` (``WS_MESSAGES``).

    Raw CR and LF can only be whitespace between JSON tokens (inside strings they are
    escaped), so blanking them keeps the JSON and the event whole.
    """
    return b"data: " + payload.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n\n"


def _ws_messages(body: bytes) -> Iterator[Any]:
    decoder = SSEDecoder()
    for event in [*decoder.feed(body), *decoder.finish()[0]]:
        if event.data:
            try:
                yield orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue


def ws_prompt_text(body: bytes) -> str:
    """The text the model reads from a WebSocket client's messages (framed by `ws_frame`)."""
    parts: list[str] = []
    for doc in _ws_messages(body):
        if not isinstance(doc, dict):
            continue
        parts.extend(_prompt_parts(doc))
        for name in _WS_NESTED:
            if isinstance(doc.get(name), dict):
                parts.extend(_prompt_parts(doc[name]))
        if isinstance(doc.get("item"), dict):
            parts.extend(_strings(doc["item"].get("content")))
        content = doc.get("clientContent")
        if isinstance(content, dict):
            parts.extend(_strings(content.get("turns")))
        realtime = doc.get("realtimeInput")
        if isinstance(realtime, dict) and isinstance(realtime.get("text"), str):
            parts.append(realtime["text"])
    return "\n".join(parts)


def _event_text(doc: Any) -> Iterator[str]:
    """The generated text in one streamed event or whole answer, by its family's shape."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("type")
    if isinstance(kind, str):
        # OpenAI Responses and Realtime: only the deltas (".done" events and
        # response.completed / response.done repeat them); audio deltas are base64 sound,
        # their transcript deltas are the text.
        if kind.startswith("response.") and kind.endswith(".delta"):
            if isinstance(doc.get("delta"), str) and not kind.endswith("audio.delta"):
                yield doc["delta"]
            return
        if kind == "content_block_delta":  # Anthropic: text, thinking, or tool input JSON
            delta = doc.get("delta") or {}
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    yield delta[key]
            return
        if kind == "message" and isinstance(doc.get("content"), list):  # Anthropic, whole answer
            for block in doc["content"]:
                yield from _strings({k: v for k, v in block.items() if k in ("text", "thinking", "input")})
            return
    for choice in doc.get("choices") or ():  # OpenAI chat: stream deltas or a whole message
        if isinstance(choice, dict):
            part = choice.get("delta") or choice.get("message") or {}
            if isinstance(choice.get("text"), str):  # legacy completions
                yield choice["text"]
            if isinstance(part, dict):
                for key in ("content", "reasoning_content", "refusal"):
                    if isinstance(part.get(key), str):
                        yield part[key]
                for call in part.get("tool_calls") or ():
                    if isinstance(call, dict) and isinstance(call.get("function"), dict):
                        yield from _strings(call["function"].get("arguments"))
    for candidate in doc.get("candidates") or ():  # Gemini
        if isinstance(candidate, dict):
            for part in (candidate.get("content") or {}).get("parts") or ():
                if isinstance(part, dict):
                    if isinstance(part.get("text"), str):
                        yield part["text"]
                    if "functionCall" in part:
                        yield orjson.dumps(part["functionCall"]).decode()
    content = doc.get("serverContent")  # Gemini Live: the turn's parts, or its transcription
    if isinstance(content, dict):
        for part in (content.get("modelTurn") or {}).get("parts") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
        transcript = content.get("outputTranscription")
        if isinstance(transcript, dict) and isinstance(transcript.get("text"), str):
            yield transcript["text"]
    if kind == "response" or (isinstance(doc.get("output"), list) and "object" in doc):  # Responses, whole
        for item in doc.get("output") or ():
            if isinstance(item, dict):
                yield from _strings(item.get("content"))
                if isinstance(item.get("arguments"), str):
                    yield item["arguments"]


def answer_text(body: bytes, sse: bool) -> str:
    """The generated text in what was relayed of an answer (SSE events, or one JSON body)."""
    parts: list[str] = []
    if sse:
        # The proxy's own SSE decoder: every legal line ending, comments, a last event cut mid-way.
        decoder = SSEDecoder()
        events = decoder.feed(body)
        events += decoder.finish()[0]
        for event in events:
            if not event.data or event.data == b"[DONE]":
                continue
            try:
                parts.extend(_event_text(orjson.loads(event.data)))
            except orjson.JSONDecodeError:
                continue  # the last event, cut mid-way
    else:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return ""  # cut mid-body: nothing to read reliably
        for item in doc if isinstance(doc, list) else [doc]:  # Gemini streams JSON arrays too
            parts.extend(_event_text(item))
    return "".join(parts)


def _bedrock_chunk_text(doc: Any) -> Iterator[str]:
    """A Bedrock InvokeModelWithResponseStream chunk: Claude's events, or another family's."""
    yield from _event_text(doc)
    if not isinstance(doc, dict):
        return
    for key in ("outputText", "generation", "completion"):  # Titan, Llama, Claude text completions
        if isinstance(doc.get(key), str):
            yield doc[key]
    for output in doc.get("outputs") or ():  # Mistral
        if isinstance(output, dict) and isinstance(output.get("text"), str):
            yield output["text"]
    nova = doc.get("contentBlockDelta")  # Amazon Nova
    if isinstance(nova, dict):
        yield from _converse_delta(nova.get("delta"))


def _converse_delta(delta: Any) -> Iterator[str]:
    """A Converse ``contentBlockDelta``'s delta: text, tool-use input JSON, or reasoning text."""
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("text"), str):
        yield delta["text"]
    tool = delta.get("toolUse")
    if isinstance(tool, dict) and isinstance(tool.get("input"), str):
        yield tool["input"]
    reasoning = delta.get("reasoningContent")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("text"), str):
        yield reasoning["text"]


def eventstream_text(body: bytes) -> str:
    """The generated text in what was relayed of a Bedrock event stream (ConverseStream,
    InvokeModelWithResponseStream); a frame cut mid-way, or a corrupt one, ends the reading."""
    buffer = EventStreamBuffer()
    parts: list[str] = []
    try:
        buffer.add_data(body)
        for message in buffer:
            if message.headers.get(":message-type") != "event":
                continue
            try:
                doc = orjson.loads(message.payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(doc, dict):
                continue
            kind = message.headers.get(":event-type")
            if kind == "contentBlockDelta":
                parts.extend(_converse_delta(doc.get("delta")))
            elif kind == "chunk" and isinstance(doc.get("bytes"), str):
                try:
                    chunk = orjson.loads(base64.b64decode(doc["bytes"], validate=True))
                except (ValueError, orjson.JSONDecodeError):
                    continue
                parts.extend(_bedrock_chunk_text(chunk))
    except ParserError:
        pass  # the rest of the stream cannot be framed: what was read stands
    return "".join(parts)


def _texts(source: EstimateSource, streamed: bool) -> tuple[str, str]:
    """The prompt and the answer text of one estimate, read as their framing says."""
    kind = source.content_type.lower()
    if kind == WS_MESSAGES:
        return ws_prompt_text(source.request), answer_text(source.response, True)
    prompt = prompt_text(source.request)
    if kind.startswith("application/vnd.amazon.eventstream"):
        return prompt, eventstream_text(source.response)
    sse = "text/event-stream" in kind if kind else streamed
    return prompt, answer_text(source.response, sse)


class Estimator:
    """Fills `RequestRecord.estimate` for records without usage; runs on the store writer's thread."""

    def __init__(self, tokenizer: Tokenizer, pricer: Callable[[], PriceFunction]) -> None:
        self.tokenizer = tokenizer
        self._pricer = pricer
        self.estimated = 0

    def prepare(self, record: RequestRecord) -> None:
        source = record.estimate_source
        record.estimate_source = None  # the texts go no further than this call
        if source is None or record.usage is not None or record.cost_usd is not None:
            return
        if record.status is None or not (200 <= record.status < 300 or record.status == 101):
            return  # no answer, or an error answer: nothing generated to estimate (101: a WebSocket's)
        count = self.tokenizer.count
        prompt, answer = _texts(source, record.streamed)
        usage = Usage(input_tokens=count(prompt), output_tokens=count(answer))
        # Priced exactly as the meter prices reported usage (same lists, aliases, dates), on a copy:
        # the record's own cost fields stay empty, so the estimate never becomes spend.
        probe = dataclasses.replace(record, usage=usage, usage_source="reported", extra={}, tags={})
        self._pricer()(probe)
        record.estimate = Estimate(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            method=self.tokenizer.name + (" (answer cut at estimate_max_bytes)" if source.truncated else ""),
            cost_usd=probe.cost_usd,
            priced_model=probe.priced_model,
        )
        self.estimated += 1

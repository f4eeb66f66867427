"""OpenAI wire format, and every server that copies it (Azure, Groq, DeepSeek,
OpenRouter, vLLM, Ollama, Mistral, xAI).

Chat Completions, Completions, Responses and Embeddings. Usage arrives:

- in a JSON body's ``usage`` object;
- in a chat stream, on a chunk with ``usage`` set, normally a final chunk with
  ``"choices": []`` that the server only sends when the request carried
  ``stream_options.include_usage``. Some servers put usage on a chunk that still
  has choices (DeepSeek, OpenRouter), on every chunk cumulatively (vLLM), or in
  ``x_groq.usage`` (Groq, which may also repeat it top-level): every one of these
  is a running total, so the last one seen wins and nothing is added twice;
- in a Responses stream, only on ``response.completed`` / ``response.incomplete``
  / ``response.failed``.

Images (``/images/generations``, ``/images/edits``: gpt-image-1's ``usage`` with the
text/image input split) and audio (``/audio/transcriptions`` and ``/translations``:
``usage`` of type ``tokens``; ``/audio/speech`` with ``stream_format: "sse"``: the
``speech.audio.done`` event) report usage in the same shape; the modality split is kept in
``extra.usage_details``. Image edits and transcriptions are multipart forms: the model and
stream flag are read from the form's fields. whisper-1 reports ``{"type": "duration"}``,
billed by the second: no token usage (``usage_source = "none"``, the seconds in a note).

Azure's first chunk (``prompt_filter_results`` with empty choices and no usage)
is not a usage chunk and passes untouched.

When the client did not ask for usage, `prepare_request` adds
``stream_options.include_usage`` with a textual edit (the rest of the body stays
byte for byte), and the parser then drops the usage-only chunk and the
``"usage":null`` the option adds to every other chunk, so the client's stream is
what it would have been.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from meterproxy.providers.base import (
    MAX_TOKENS,
    BadUsage,
    ParseResult,
    RequestInfo,
    choices_asked,
    count,
    error_text,
    find_json_value,
    loads,
    quiet_run_end,
    to_decimal,
)
from meterproxy.sse import SSEEvent
from meterproxy.usage import Usage

__all__ = ["OpenAIParser", "OpenAIProvider", "normalize_openai_usage"]

_SUFFIXES = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/images/generations": "images",
    "/images/edits": "image_edits",
    "/audio/transcriptions": "transcriptions",
    "/audio/translations": "translations",
    "/audio/speech": "speech",
}
# Streams of these endpoints end with one event that carries the usage.
_FINAL_EVENTS = (
    b'"speech.audio.done"',
    b'"transcript.text.done"',
    b'"image_generation.completed"',
    b'"image_edit.completed"',
)
_FORM_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="([^"]*)"')
_FORM_FIELDS = (b"model", b"stream", b"user")


def form_fields(body: bytes, limit: int = 1 << 20) -> dict[bytes, bytes]:
    """The small text fields of a multipart/form-data body (model, stream, user).

    Split at the boundary the body opens with, so a file's bytes are never read as a
    field; parts are looked at only within the first ``limit`` bytes.
    """
    boundary, _, _ = body[:200].partition(b"\r\n")
    if not boundary.startswith(b"--") or len(boundary) < 3:
        return {}
    fields: dict[bytes, bytes] = {}
    for part in body[:limit].split(b"\r\n" + boundary):
        head, sep, value = part.lstrip(b"-").lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep or b"filename=" in head:
            continue
        match = _FORM_NAME.search(head)
        if match and match.group(1) in _FORM_FIELDS:
            fields[match.group(1)] = value.strip()
    return fields


_USAGE_NULL = b',"usage":null'
#: The injected null as OpenAI writes it, the last member of its chunk, with the event's end.
_USAGE_NULL_END = _USAGE_NULL + b"}\n\n"
#: What stops `OpenAIParser.quiet`'s run: an event that may be more than a content delta.
_QUIET_STOPS = (b'"usage":{', b'"usage": {', b'"error"', b'"x_groq"', b"[DONE]", *_FINAL_EVENTS)
#: The same for chat and completions streams, whose chunks are never the audio and image APIs'
#: final events (a quoted name inside content is escaped, so cannot match either): each marker
#: left out is one scan less of every read (bench/README.md, "quiet on an instant stream").
_CHAT_QUIET_STOPS = _QUIET_STOPS[: -len(_FINAL_EVENTS)]
#: The endpoints whose streams are chat-style chunks: the ones usage is injected into, too.
_CHAT_ENDPOINTS = frozenset(("chat", "completions"))
#: What stops a Responses stream's quiet run: the events `_on_responses_event` reads, by name
#: (``event:error`` without the space fails `_quiet_responses`' check of every event's first line).
_RESPONSES_QUIET_STOPS = (
    b"response.created",
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"event: error",
)
# The same member written with any JSON whitespace (some compatible servers pretty-print or
# write ``", "usage": null``), or as the first member. A string value cannot hold an
# unescaped quote, so ``"usage"`` preceded by a comma and blanks is always the key.
_USAGE_NULL_RE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|(?<=\{)\s*"usage"\s*:\s*null\s*,')


def _has_usage_null(data: bytes) -> bool:
    return b'"usage":null' in data or (b"null" in data and _USAGE_NULL_RE.search(data) is not None)


def _strip_usage_null(raw: bytes) -> bytes:
    """Remove the one ``"usage": null`` the injected option added, bytes around it untouched."""
    if _USAGE_NULL in raw:
        return raw.replace(_USAGE_NULL, b"", 1)
    return _USAGE_NULL_RE.sub(b"", raw, count=1)


#: (key in a details object, its name in ``extra.usage_details`` for input, for output).
_MODALITIES = tuple(
    (f"{m}_tokens", f"input_{m}_tokens", f"output_{m}_tokens") for m in ("text", "audio", "image")
)
_MODALITY_KEYS = frozenset(m[0] for m in _MODALITIES)


def modality_details(usage: Any) -> dict[str, int]:
    """The text/audio/image split of an images, audio or realtime ``usage`` (empty if none)."""
    details: dict[str, int] = {}
    if not isinstance(usage, dict):
        return details
    get = usage.get
    sides = (
        (1, get("input_tokens_details") or get("input_token_details")),
        (1, get("prompt_tokens_details")),
        (2, get("output_tokens_details") or get("output_token_details")),
        (2, get("completion_tokens_details")),
    )
    for side, split in sides:
        # Most details objects name no modality (``cached_tokens``, ``reasoning_tokens``).
        if not split or not isinstance(split, dict) or _MODALITY_KEYS.isdisjoint(split):
            continue
        for modality in _MODALITIES:
            value = split.get(modality[0])
            if value is not None and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                details[modality[side]] = value
    return details


def normalize_openai_usage(usage: Any) -> Usage:
    """Chat/Completions/Embeddings (``prompt_tokens``) or Responses (``input_tokens``) usage."""
    if type(usage) is dict:
        plain = _normalize_plain(usage)
        if plain is not None:
            return plain
    return _normalize_checked(usage)


def _normalize_plain(usage: dict[str, Any]) -> Usage | None:
    """`_normalize_checked` of the usual shape, without a call per count; None for any other.

    The usual shape: every count a plain ``int`` in range or absent, the details objects
    objects or absent, no DeepSeek cache field. Anything else (a float, a bool, a negative,
    a count past its total) returns None and is checked the long way, which raises the
    same `BadUsage` it always did.
    """
    get = usage.get
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp, out = get("prompt_tokens"), get("completion_tokens")
        in_d, out_d = get("prompt_tokens_details"), get("completion_tokens_details")
    elif "input_tokens" in usage or "output_tokens" in usage:
        inp, out = get("input_tokens"), get("output_tokens")
        in_d, out_d = get("input_tokens_details"), get("output_tokens_details")
    else:
        return None
    if in_d is None:
        in_d = get("input_token_details")
    if "prompt_cache_hit_tokens" in usage:
        return None
    cached = in_audio = in_image = cached_audio = reasoning = out_audio = out_image = None
    if in_d is not None:
        if type(in_d) is not dict:
            return None
        cached, in_audio, in_image = (
            in_d.get("cached_tokens"),
            in_d.get("audio_tokens"),
            in_d.get("image_tokens"),
        )
        cached_d = in_d.get("cached_tokens_details")
        if cached_d is not None:
            if type(cached_d) is not dict:
                return None
            cached_audio = cached_d.get("audio_tokens")
    if out_d is not None:
        if type(out_d) is not dict:
            return None
        reasoning, out_audio, out_image = (
            out_d.get("reasoning_tokens"),
            out_d.get("audio_tokens"),
            out_d.get("image_tokens"),
        )
    for value in (inp, out, cached, reasoning, in_audio, cached_audio, in_image, out_audio, out_image):
        if value is not None and (type(value) is not int or value < 0 or value > MAX_TOKENS):
            return None
    inp, out, cached, reasoning = inp or 0, out or 0, cached or 0, reasoning or 0
    if cached > inp or reasoning > out:
        return None
    in_audio, cached_audio, in_image = in_audio or 0, cached_audio or 0, in_image or 0
    out_audio, out_image = out_audio or 0, out_image or 0
    # Usage's fields in order: input, cache read, cache write, 1h cache write, output,
    # reasoning, web searches, audio input, audio cache read, image input, audio output,
    # image output (each modality capped at its total, as `_normalize_checked` does).
    return Usage(
        inp,
        cached,
        0,
        0,
        out,
        reasoning,
        0,
        in_audio if in_audio < inp else inp,
        cached_audio if cached_audio < cached else cached,
        in_image if in_image < inp else inp,
        out_audio if out_audio < out else out,
        out_image if out_image < out else out,
    )


def _normalize_checked(usage: Any) -> Usage:
    """`normalize_openai_usage` of any shape, each count checked on its own (`count`)."""
    if not isinstance(usage, dict):
        raise BadUsage("usage is not an object")
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        input_tokens = count(usage, "prompt_tokens")
        output_tokens = count(usage, "completion_tokens")
        in_details = usage.get("prompt_tokens_details")
        out_details = usage.get("completion_tokens_details")
    elif "input_tokens" in usage or "output_tokens" in usage:
        input_tokens = count(usage, "input_tokens")
        output_tokens = count(usage, "output_tokens")
        in_details = usage.get("input_tokens_details")
        out_details = usage.get("output_tokens_details")
    else:
        raise BadUsage("usage has no token counts")
    if in_details is None:
        in_details = usage.get("input_token_details")  # audio transcriptions' spelling
    cache_read = count(in_details, "cached_tokens")
    if "prompt_cache_hit_tokens" in usage:  # DeepSeek
        cache_read = max(cache_read, count(usage, "prompt_cache_hit_tokens"))
    reasoning = count(out_details, "reasoning_tokens")
    if cache_read > input_tokens or reasoning > output_tokens:
        raise BadUsage("cached or reasoning tokens exceed their total")
    cached_details = in_details.get("cached_tokens_details") if isinstance(in_details, dict) else None
    return Usage(
        input_tokens=input_tokens,
        cache_read_tokens=cache_read,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning,
        audio_input_tokens=min(count(in_details, "audio_tokens"), input_tokens),
        audio_cache_read_tokens=min(count(cached_details, "audio_tokens"), cache_read),
        image_input_tokens=min(count(in_details, "image_tokens"), input_tokens),
        audio_output_tokens=min(count(out_details, "audio_tokens"), output_tokens),
        image_output_tokens=min(count(out_details, "image_tokens"), output_tokens),
    )


def _quiet_responses(events: bytes) -> tuple[int, bytes]:
    """`OpenAIParser.quiet` for a Responses stream (Codex CLI's): its deltas and item events.

    `_on_responses_event` reads only the events `_RESPONSES_QUIET_STOPS` names, and a nameless
    event's payload (for its ``type``; a malformed one is noted). So the run stops before the first
    of those names, and is taken only if every event in it opens with ``event: response.``: a
    nameless event, a comment or a stray blank line leaves the whole run to the decoder.
    """
    cut = quiet_run_end(events, _RESPONSES_QUIET_STOPS)
    if not cut:
        return 0, b""
    if cut < len(events):
        events = events[:cut]
    blocks = events.split(b"\n\n")
    blocks.pop()  # what follows the last blank line: b"" (the run is whole events)
    for block in blocks:
        if block[:16] != b"event: response.":
            return 0, b""
    return cut, events


class OpenAIParser:
    __slots__ = ("_endpoint", "_final", "_injected", "_responses", "_result", "_seen_model", "_streamed")

    def __init__(self, injected: bool, responses: bool, endpoint: str = "") -> None:
        self._result = ParseResult()
        self._injected = injected
        self._seen_model = False
        self._responses = responses
        # images / speech: output is all image / audio tokens unless the usage splits it.
        self._endpoint = endpoint
        # A chat stream's usage (vLLM's running totals) is complete once the stream says it
        # ended ([DONE], a finish_reason, the usage-only chunk); cut before, a lower bound.
        self._streamed = False
        self._final = False

    def _take_usage(self, usage: Any, container: Any) -> None:
        if isinstance(usage, dict) and usage.get("type") == "duration":
            # whisper-1 bills by the second, not by token: no token usage to record.
            self._result.notes.append(f"billed by duration: {usage.get('seconds')} s")
            self._result.usage_source = "none"
            return
        try:
            self._result.usage = normalized = normalize_openai_usage(usage)
            self._result.usage_source = "reported"
            if not (normalized.audio_output_tokens or normalized.image_output_tokens):
                if self._endpoint in ("images", "image_edits"):
                    normalized.image_output_tokens = normalized.output_tokens
                elif self._endpoint == "speech":
                    normalized.audio_output_tokens = normalized.output_tokens
        except BadUsage as exc:
            self._result.usage = None
            self._result.usage_source = "invalid"
            self._result.notes.append(str(exc))
            return
        if isinstance(usage, dict):
            self._result.details = modality_details(usage)
            cost = usage.get("cost")  # OpenRouter's; none elsewhere: no call
            if cost is not None:
                cost = to_decimal(cost)
                if cost is not None:
                    self._result.provider_cost_usd = cost
        if isinstance(container, dict) and isinstance(container.get("service_tier"), str):
            self._result.service_tier = container["service_tier"]

    def _take_model(self, obj: Any) -> None:
        model = obj.get("model") if isinstance(obj, dict) else None
        # Azure's content-filter chunk answers with model "": not an answer yet.
        if isinstance(model, str) and model:
            self._result.model = model
            self._seen_model = True

    def quiet(self, events: bytes) -> tuple[int, bytes]:
        """Whole events (``data:`` blocks, each ending in a blank line): how many leading
        bytes of them matter nothing here, and the bytes `on_event` would have returned.

        The same byte checks as `on_event`'s ``interesting``, over many events at once: once
        the model is known, a content delta carries no usage but ``,"usage":null``, no
        error. The run stops before the first event that could be more (a usage object,
        an error, Groq's ``x_groq``, ``[DONE]``, a final event of audio or images); that one
        goes through `on_event`.
        """
        if self._responses:
            return _quiet_responses(events)
        if not self._seen_model:
            return 0, b""
        cut = quiet_run_end(events, _CHAT_QUIET_STOPS if self._endpoint in _CHAT_ENDPOINTS else _QUIET_STOPS)
        if not cut:
            return 0, b""
        usage = events.count(b'"usage"', 0, cut)
        # OpenAI's shape: every "usage" in the run is a null closing its event. An event ends at
        # its first blank line, so each holds at most one: one replace strips exactly one per event.
        closing = usage and events.count(_USAGE_NULL_END, 0, cut) == usage
        if usage and not closing and usage != events.count(_USAGE_NULL, 0, cut):
            return 0, b""  # any other spelling of it: event by event
        taken = events[:cut] if cut < len(events) else events
        self._streamed = True
        if b'"finish_reason":"' in taken or b'"finish_reason": "' in taken:
            self._final = True
        if not usage or not self._injected:
            return cut, taken
        if closing and b"\n\n\n" not in taken:  # (the decoder drops a stray blank line: event by event)
            return cut, taken.replace(_USAGE_NULL_END, b"}\n\n")
        if taken.find(b"\n\n") == len(taken) - 2 and taken[:5] == b"data:":
            # One event, as a paced stream's reads mostly bring: the split, check and join
            # below for a single block.
            return cut, taken.replace(_USAGE_NULL, b"", 1)
        blocks = taken.split(b"\n\n")
        if any(block[:5] != b"data:" for block in blocks[:-1]):
            return 0, b""  # comments or blank lines would join a neighbour's raw bytes
        return cut, b"\n\n".join([block.replace(_USAGE_NULL, b"", 1) for block in blocks])

    def on_event(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if self._responses:
            self._on_responses_event(event)
            return event.raw
        self._streamed = True
        if data == b"[DONE]":
            self._final = True
            return event.raw
        if b'"finish_reason":"' in data or b'"finish_reason": "' in data:
            self._final = True
        if any(name in data for name in _FINAL_EVENTS):
            self._final = True
        # Content text cannot contain an unescaped '"usage"', so these byte checks are
        # exact, and most chunks (content deltas) skip JSON parsing entirely.
        interesting = (
            not self._seen_model
            or (b'"usage"' in data and not _has_usage_null(data))
            or b'"error"' in data
            or b'"x_groq"' in data
        )
        if not interesting:
            return _strip_usage_null(event.raw) if self._injected else event.raw
        chunk = loads(data)
        if not isinstance(chunk, dict):
            self._result.notes.append("malformed stream chunk")
            if b'"usage"' in data and not _has_usage_null(data):
                # An unreadable usage frame: flagged, unless a later frame's total replaces it.
                self._result.usage, self._result.usage_source = None, "invalid"
            return event.raw
        if not self._seen_model:
            self._take_model(chunk)
        if "error" in chunk and chunk.get("error"):
            self._result.error = error_text(chunk["error"])
        usage = chunk.get("usage")
        groq = chunk.get("x_groq")
        if usage is None and isinstance(groq, dict) and groq.get("usage") is not None:
            usage = groq["usage"]
        if usage is not None:
            self._take_usage(usage, chunk)
            if chunk.get("choices") == []:
                self._final = True
            if self._injected and chunk.get("choices") == []:
                return None  # the usage-only chunk the client did not ask for
        if self._injected:
            return _strip_usage_null(event.raw)
        return event.raw

    def _on_responses_event(self, event: SSEEvent) -> None:
        name = event.event
        if name is None:
            # Some servers omit `event:`; the type is in the payload.
            if b'"type"' not in event.data:
                return
        elif name not in (
            "response.created",
            "response.completed",
            "response.incomplete",
            "response.failed",
            "error",
        ):
            return
        payload = loads(event.data)
        if not isinstance(payload, dict):
            self._result.notes.append("malformed stream event")
            if b'"usage"' in event.data:
                self._result.usage, self._result.usage_source = None, "invalid"
            return
        kind = payload.get("type", name)
        if kind == "error":
            self._result.error = error_text(payload.get("error") or payload)
            return
        response = payload.get("response")
        if not isinstance(response, dict):
            return
        self._take_model(response)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            if response.get("usage") is not None:
                self._take_usage(response["usage"], response)
            if kind == "response.failed" and response.get("error"):
                self._result.error = error_text(response["error"])

    def on_body(self, body: bytes, truncated: bool) -> None:
        obj = None
        if not truncated:
            try:  # `loads` inline: a call fewer per answer
                obj = orjson.loads(body)
            except (orjson.JSONDecodeError, TypeError):
                pass
        if isinstance(obj, dict):
            self._take_model(obj)
            if obj.get("error"):
                self._result.error = error_text(obj["error"])
            if obj.get("usage") is not None:
                self._take_usage(obj["usage"], obj)
            return
        if truncated:
            self._result.model = self._result.model or _str(find_json_value(body, "model"))
            usage = find_json_value(body, "usage")
            if usage is not None:
                self._take_usage(usage, None)
                self._result.notes.append("usage read from the tail of a large body")
            return
        if body.strip():
            self._result.notes.append("answer is not valid JSON")

    def result(self) -> ParseResult:
        if self._streamed and not self._final and self._result.usage_source == "reported":
            self._result.usage_source = "partial"
        return self._result


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class OpenAIProvider:
    name = "openai"

    def __init__(self) -> None:
        #: `endpoint` of each path asked about (bounded: the paths in use are few), so the
        #: proxy's record, the injection check and the parser cost a lookup, not a walk over the
        #: suffixes.
        self._endpoints: dict[str, str] = {}

    def matches(self, path: str) -> bool:
        return any(path.endswith(suffix) for suffix in _SUFFIXES)

    def endpoint(self, path: str) -> str:
        try:
            return self._endpoints[path]
        except KeyError:
            pass
        name = next((name for suffix, name in _SUFFIXES.items() if path.endswith(suffix)), "other")
        if len(self._endpoints) >= 1024:
            self._endpoints.clear()
        self._endpoints[path] = name
        return name

    def inspect_request(self, path: str, body: bytes) -> RequestInfo:
        try:
            obj = orjson.loads(body) if body else None
        except (orjson.JSONDecodeError, TypeError):
            obj = None
        if type(obj) is dict:
            # Each read as `_str` / `int_or_none` would (JSON gives exact str, int, bool).
            get = obj.get
            model, user, tier = get("model"), get("user"), get("service_tier")
            if type(user) is not str or not user:
                user = get("safety_identifier")
            limit = None
            for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
                value = get(name)
                if type(value) is int and value >= 0:
                    limit = value
                    break
            n, best_of = get("n"), get("best_of")
            return RequestInfo(
                model if type(model) is str else None,
                get("stream") is True,
                user if type(user) is str else None,
                tier if type(tier) is str else None,
                obj,
                limit,
                1 if n is None and best_of is None else choices_asked(n, best_of),
            )
        info = RequestInfo(body=obj)
        if obj is None and body.startswith(b"--"):
            # multipart/form-data (image edits, transcriptions): model and stream are fields.
            fields = form_fields(body)
            info.model = fields.get(b"model", b"").decode("utf-8", "replace") or None
            info.stream = fields.get(b"stream", b"").strip().lower() == b"true"
            info.user = fields.get(b"user", b"").decode("utf-8", "replace") or None
        return info

    def prepare_request(self, path: str, body: bytes, info: RequestInfo) -> tuple[bytes, bool]:
        if not info.stream:
            return body, False
        if self.endpoint(path) not in _CHAT_ENDPOINTS:
            return body, False
        obj = info.body
        if not isinstance(obj, dict):
            return body, False
        options = obj.get("stream_options")
        if options is None and "stream_options" not in obj:
            # A textual insert keeps every other byte of the client's body as sent.
            end = body.rstrip()
            if end.endswith(b"}"):
                return end[:-1].rstrip() + b',"stream_options":{"include_usage":true}}', True
            return body, False
        if isinstance(options, dict) and options.get("include_usage") is not True:
            options = {**options, "include_usage": True}
            return orjson.dumps({**obj, "stream_options": options}), True
        return body, False

    def new_parser(self, path: str, info: RequestInfo, injected: bool) -> OpenAIParser:
        endpoint = self.endpoint(path)
        return OpenAIParser(injected, responses=endpoint == "responses", endpoint=endpoint)

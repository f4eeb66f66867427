"""Usage of WebSocket sessions: OpenAI Realtime, Responses over WebSocket, Gemini Live.

A session is long and holds many model responses, so it is metered **one row
per response**: each response is billed on its own (its usage arrives in its
own event), it has its own model and time, and budgets and reports see spend as
it happens rather than when a voice call hangs up an hour later. Every row of a
session carries the same ``extra.ws_session`` id. A session that ends with no
response at all still gets one row (``usage_source="none"``), so every
connection is visible.

The events, per dialect (the JSON messages a `wsframes.MessageDecoder` hands us):

- **OpenAI Realtime** (``/v1/realtime``): a transcribed input item
  (``conversation.item.input_audio_transcription.completed``) is billed to the session's
  transcription model and gets a row of its own; ``response.created`` opens a response,
  ``response.done`` closes it with ``response.usage`` (``input_tokens``,
  ``output_tokens``, ``input_token_details`` with ``cached_tokens`` and the
  text/audio/image split). The model is the ``?model=`` of the handshake or the
  one ``session.created`` / ``session.updated`` name.
- **Responses over WebSocket** (``GET /v1/responses`` upgraded, what Codex uses):
  the client sends ``response.create`` messages; the server answers with the
  Responses streaming events, and ``response.completed`` / ``.incomplete`` /
  ``.failed`` carry ``response.usage`` and ``response.model``.
- **Gemini Live** (``...BidiGenerateContent``): the client's first message is
  ``setup`` with the model; the server sends ``usageMetadata`` for the turn, and
  ``serverContent.turnComplete`` ends it. Several ``usageMetadata`` within one turn
  are running totals (the last wins, nothing is added twice).

A response that started and never finished because the socket closed is
recorded with the usage it reported so far (none, for these dialects):
``usage_source="missing"`` and an error saying the session closed mid-response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from meterproxy.providers.base import BadUsage, ParseResult, count, error_text, loads
from meterproxy.providers.gemini import normalize_gemini_usage
from meterproxy.providers.openai import modality_details, normalize_openai_usage
from meterproxy.usage import Usage

__all__ = [
    "LiveKind",
    "LiveParser",
    "LiveResponse",
    "live_kind",
    "normalize_realtime_usage",
]


@dataclass(slots=True)
class LiveResponse:
    """One finished (or cut) response of a session: what its row records."""

    result: ParseResult
    started: float  # time.monotonic() when it began (or when the previous one ended)
    ended: float
    details: dict[str, int] = field(default_factory=dict)  # modality split, when reported
    #: A model's response (estimate_usage may count it); False for an input transcription.
    estimable: bool = True


class LiveParser(Protocol):
    def on_client_message(self, payload: bytes) -> None:
        """A message the client sent (the model may be named here)."""

    def on_server_message(self, payload: bytes) -> list[LiveResponse]:
        """A message the server sent; returns the responses it finished."""

    def finish(self) -> list[LiveResponse]:
        """The session ended: responses still open, as cut."""

    @property
    def model(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class LiveKind:
    """Which dialect a WebSocket path speaks: provider name, endpoint name, parser factory."""

    provider: str
    endpoint: str

    def new_parser(self, query_string: str) -> LiveParser:
        model = dict(parse_qsl(query_string)).get("model")
        if self.endpoint == "realtime":
            return RealtimeParser(model)
        if self.endpoint == "responses":
            return ResponsesSocketParser(model)
        return GeminiLiveParser(model)


def live_kind(path: str) -> LiveKind | None:
    """The dialect of a WebSocket request's upstream path, or None (relayed, not metered)."""
    if path.endswith("/realtime"):
        return LiveKind("openai", "realtime")
    if path.endswith("/responses"):
        return LiveKind("openai", "responses")
    if path.endswith("BidiGenerateContent") or path.endswith("BidiGenerateContentConstrained"):
        return LiveKind("gemini", "live")
    return None


_REALTIME_DETAIL_KEYS = ("text_tokens", "audio_tokens", "image_tokens")


def normalize_realtime_usage(usage: Any) -> tuple[Usage, dict[str, int]]:
    """A Realtime ``response.usage``: the totals, and the modality split (``input_audio_tokens``...)."""
    if not isinstance(usage, dict) or not ("input_tokens" in usage or "output_tokens" in usage):
        raise BadUsage("usage has no token counts")
    input_tokens = count(usage, "input_tokens")
    output_tokens = count(usage, "output_tokens")
    in_details = usage.get("input_token_details")
    out_details = usage.get("output_token_details")
    cached = count(in_details, "cached_tokens")
    if cached > input_tokens:
        raise BadUsage("cached_tokens exceeds input_tokens")
    details: dict[str, int] = {}
    for key in _REALTIME_DETAIL_KEYS:
        modality = key.removesuffix("_tokens")
        if isinstance(in_details, dict) and key in in_details:
            details[f"input_{modality}_tokens"] = count(in_details, key)
        if isinstance(out_details, dict) and key in out_details:
            details[f"output_{modality}_tokens"] = count(out_details, key)
    cached_details = in_details.get("cached_tokens_details") if isinstance(in_details, dict) else None
    if isinstance(cached_details, dict):
        for key in _REALTIME_DETAIL_KEYS:
            if key in cached_details:
                details[f"cached_{key.removesuffix('_tokens')}_tokens"] = count(cached_details, key)
    out = Usage(
        input_tokens=input_tokens,
        cache_read_tokens=cached,
        output_tokens=output_tokens,
        audio_input_tokens=min(details.get("input_audio_tokens", 0), input_tokens),
        audio_cache_read_tokens=min(details.get("cached_audio_tokens", 0), cached),
        image_input_tokens=min(details.get("input_image_tokens", 0), input_tokens),
        audio_output_tokens=min(details.get("output_audio_tokens", 0), output_tokens),
    )
    return out, details


def _event(payload: bytes) -> dict[str, Any] | None:
    obj = loads(payload)
    return obj if isinstance(obj, dict) else None


class RealtimeParser:
    """OpenAI Realtime (see module docstring)."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        self._open: dict[str, float] = {}
        self._last_end = time.monotonic()
        self._session_error: str | None = None
        # The session's input transcription model (billed apart, per transcribed item).
        self._transcriber: str | None = None

    def on_client_message(self, payload: bytes) -> None:
        return None

    def on_server_message(self, payload: bytes) -> list[LiveResponse]:
        # Audio deltas are most of the traffic: skip them without parsing.
        head = payload[:96]
        if b"input_audio_transcription.completed" in head:
            return self._transcription(payload)
        if b'"response.done"' not in payload and b'"session.' not in head and b"response.created" not in head:
            if b'"error"' in head:
                event = _event(payload)
                if event is not None and event.get("type") == "error":
                    self._session_error = error_text(event.get("error"))
            return []
        event = _event(payload)
        if event is None:
            return []
        kind = event.get("type")
        if kind in ("session.created", "session.updated"):
            session = event.get("session")
            model = session.get("model") if isinstance(session, dict) else None
            if isinstance(model, str) and model:
                self.model = model
            transcriber = _transcription_model(session)
            if transcriber:
                self._transcriber = transcriber
            return []
        response = event.get("response")
        if not isinstance(response, dict):
            return []
        rid = str(response.get("id") or "")
        now = time.monotonic()
        if kind == "response.created":
            self._open[rid] = now
            return []
        if kind != "response.done":
            return []
        started = self._open.pop(rid, self._last_end)
        self._last_end = now
        result = ParseResult(model=self.model)
        details: dict[str, int] = {}
        usage = response.get("usage")
        if usage is not None:
            try:
                result.usage, details = normalize_realtime_usage(usage)
                result.usage_source = "reported"
            except BadUsage as exc:
                result.usage_source = "invalid"
                result.notes.append(str(exc))
        status = response.get("status")
        if status == "failed":
            status_details = response.get("status_details")
            err = status_details.get("error") if isinstance(status_details, dict) else None
            result.error = error_text(err) if err else "response failed"
        elif status in ("cancelled", "incomplete"):
            result.notes.append(f"response {status}")
        return [LiveResponse(result, started, now, details)]

    def _transcription(self, payload: bytes) -> list[LiveResponse]:
        """A transcribed input item: billed to the transcription model, a row of its own."""
        event = _event(payload)
        if event is None or not str(event.get("type", "")).endswith("input_audio_transcription.completed"):
            return []
        usage = event.get("usage")
        now = time.monotonic()
        result = ParseResult(model=self._transcriber)
        details: dict[str, int] = {}
        if isinstance(usage, dict) and usage.get("type") == "duration":
            result.usage_source = "none"
            result.notes.append(f"billed by duration: {usage.get('seconds')} s")
        elif usage is not None:
            try:
                result.usage = normalize_openai_usage(usage)
                result.usage_source = "reported"
                details = modality_details(usage)
            except BadUsage as exc:
                result.usage_source = "invalid"
                result.notes.append(str(exc))
        result.notes.append("input audio transcription")
        return [LiveResponse(result, now, now, details, estimable=False)]

    def finish(self) -> list[LiveResponse]:
        now = time.monotonic()
        cut = [_cut(self.model, started, now, self._session_error) for started in self._open.values()]
        self._open.clear()
        return cut


def _transcription_model(session: Any) -> str | None:
    """The input transcription model a session names (GA ``audio.input.transcription``,
    beta ``input_audio_transcription``)."""
    if not isinstance(session, dict):
        return None
    audio = session.get("audio")
    inp = audio.get("input") if isinstance(audio, dict) else None
    config = inp.get("transcription") if isinstance(inp, dict) else None
    if not isinstance(config, dict):
        config = session.get("input_audio_transcription")
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, str) and model else None


def _cut(model: str | None, started: float, now: float, why: str | None) -> LiveResponse:
    result = ParseResult(model=model)
    result.error = "session closed before the response finished" + (f" ({why})" if why else "")
    return LiveResponse(result, started, now)


class ResponsesSocketParser:
    """The Responses API over a WebSocket (see module docstring)."""

    _FINAL = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')

    def __init__(self, model: str | None) -> None:
        self.model = model
        self._open: dict[str, float] = {}
        self._last_end = time.monotonic()

    def on_client_message(self, payload: bytes) -> None:
        if b'"response.create"' in payload[:64] or b'"model"' in payload:
            event = _event(payload)
            model = event.get("model") if event is not None else None
            if isinstance(model, str) and model:
                self.model = model

    def on_server_message(self, payload: bytes) -> list[LiveResponse]:
        head = payload[:64]
        final = any(name in head for name in self._FINAL)
        if not final and b'"response.created"' not in head and b'"error"' not in head:
            return []
        event = _event(payload)
        if event is None:
            return []
        kind = event.get("type")
        now = time.monotonic()
        if kind == "error":
            # A request the server refused: it is a response, with no usage.
            self._last_end = now
            result = ParseResult(model=self.model, error=error_text(event.get("error") or event))
            return [LiveResponse(result, self._last_end, now)]
        response = event.get("response")
        if not isinstance(response, dict):
            return []
        rid = str(response.get("id") or "")
        model = response.get("model")
        if kind == "response.created":
            self._open[rid] = now
            return []
        if kind not in ("response.completed", "response.incomplete", "response.failed"):
            return []
        started = self._open.pop(rid, self._last_end)
        self._last_end = now
        result = ParseResult(model=model if isinstance(model, str) and model else self.model)
        if isinstance(response.get("service_tier"), str):
            result.service_tier = response["service_tier"]
        usage = response.get("usage")
        if usage is not None:
            try:
                result.usage = normalize_openai_usage(usage)
                result.usage_source = "reported"
            except BadUsage as exc:
                result.usage_source = "invalid"
                result.notes.append(str(exc))
        if kind == "response.failed" and response.get("error"):
            result.error = error_text(response["error"])
        return [LiveResponse(result, started, now)]

    def finish(self) -> list[LiveResponse]:
        now = time.monotonic()
        cut = [_cut(self.model, started, now, None) for started in self._open.values()]
        self._open.clear()
        return cut


class GeminiLiveParser:
    """Gemini Live (see module docstring)."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        self._usage: Any = None  # the turn's latest usageMetadata
        self._turn_started: float | None = None
        self._last_end = time.monotonic()
        self._ended = False  # turnComplete seen, its usage not yet

    def on_client_message(self, payload: bytes) -> None:
        if b'"setup"' not in payload[:64]:
            return
        message = _event(payload)
        setup = message.get("setup") if message is not None else None
        model = setup.get("model") if isinstance(setup, dict) else None
        if isinstance(model, str) and model:
            self.model = model.rsplit("/", 1)[-1]

    def on_server_message(self, payload: bytes) -> list[LiveResponse]:
        usage_here = b'"usageMetadata"' in payload
        if not usage_here and b'"turnComplete"' not in payload:
            out = self._end_turn(cut=False) if self._ended else []
            if self._turn_started is None and b'"serverContent"' in payload:
                self._turn_started = time.monotonic()
            return out
        message = _event(payload)
        if message is None:
            return []
        if self._turn_started is None:
            self._turn_started = time.monotonic()
        if isinstance(message.get("usageMetadata"), dict):
            self._usage = message["usageMetadata"]
        content = message.get("serverContent")
        if isinstance(content, dict) and content.get("turnComplete") is True:
            if self._usage is not None:
                return self._end_turn(cut=False)
            self._ended = True  # its usage may follow in a message of its own
            return []
        if usage_here and self._ended:
            return self._end_turn(cut=False)
        return []

    def _end_turn(self, *, cut: bool) -> list[LiveResponse]:
        now = time.monotonic()
        started = self._turn_started if self._turn_started is not None else self._last_end
        result = ParseResult(model=self.model)
        details: dict[str, int] = {}
        if self._usage is not None:
            try:
                result.usage = _live_usage(self._usage)
                result.usage_source = "reported"
                details = _modality_split(self._usage)
            except BadUsage as exc:
                result.usage_source = "invalid"
                result.notes.append(str(exc))
        elif cut and not self._ended:
            result.error = "session closed before the turn finished"
        self._usage, self._turn_started, self._last_end, self._ended = None, None, now, False
        return [LiveResponse(result, started, now, details)]

    def finish(self) -> list[LiveResponse]:
        if self._usage is None and self._turn_started is None and not self._ended:
            return []
        return self._end_turn(cut=True)


def _live_usage(meta: Any) -> Usage:
    """Live's ``usageMetadata`` names the output ``responseTokenCount`` (generateContent's
    ``candidatesTokenCount``); otherwise the same meanings as `normalize_gemini_usage`."""
    if isinstance(meta, dict) and "responseTokenCount" in meta and "candidatesTokenCount" not in meta:
        meta = {**meta, "candidatesTokenCount": meta["responseTokenCount"]}
    return normalize_gemini_usage(meta)


def _modality_split(meta: dict[str, Any]) -> dict[str, int]:
    details: dict[str, int] = {}
    for key, side in (("promptTokensDetails", "input"), ("responseTokensDetails", "output")):
        items = meta.get(key)
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("modality"), str):
                name = f"{side}_{item['modality'].lower()}_tokens"
                details[name] = details.get(name, 0) + count(item, "tokenCount")
    return details

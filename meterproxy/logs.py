"""Logging setup that never writes a credential.

`RedactingFilter` masks API keys in every log line, whatever logger produced
it: bearer tokens, ``x-api-key``/``x-goog-api-key``/``api-key`` header values,
``key=`` query parameters and anything shaped like a provider key (``sk-...``,
``AIza...``).
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "configure_logging", "redact"]

_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[^\s'\",]+"),
    re.compile(r"(?i)((?:x-api-key|x-goog-api-key|api-key|authorization)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
    re.compile(r"(?i)([?&]key=)[^&\s'\"]+"),
    re.compile(r"()\b(?:sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|gsk_[A-Za-z0-9]{8,})"),
]


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "[REDACTED]", text)
    return text


_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts the whole record: message, arguments, attached exception and stack.

    An exception's text often quotes the raw input (aiohttp's parse errors quote
    the offending request line or header), so the traceback is formatted here,
    redacted, and left in ``exc_text``, which formatters use instead of
    formatting ``exc_info`` again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

"""Provider wire formats, chosen by request path.

The built-in parsers register exactly the way an extension would: through
`register`. `detect` asks each registered provider, most recently registered
first, so an extension can claim a path before a built-in does.
"""

from __future__ import annotations

from meterproxy.providers.anthropic import AnthropicProvider
from meterproxy.providers.base import ParseResult, Provider, RequestInfo, UsageParser
from meterproxy.providers.gemini import GeminiProvider
from meterproxy.providers.openai import OpenAIProvider

__all__ = ["ParseResult", "Provider", "RequestInfo", "UsageParser", "detect", "register", "registered"]

_REGISTRY: list[Provider] = []


def register(provider: Provider) -> None:
    _REGISTRY.insert(0, provider)


def registered() -> list[Provider]:
    return list(_REGISTRY)


def detect(path: str) -> Provider | None:
    """The wire family of an upstream path (no query string), or None (forwarded unmetered)."""
    for provider in _REGISTRY:
        if provider.matches(path):
            return provider
    return None


# Order matters only where paths overlap: "/messages" is Anthropic, the OpenAI
# suffixes never end in "/messages", Gemini's ":generateContent" is unique.
for _builtin in (OpenAIProvider(), GeminiProvider(), AnthropicProvider()):
    register(_builtin)

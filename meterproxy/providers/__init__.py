"""Provider wire formats, chosen by request path.

The built-in parsers register exactly the way an extension would: through
`ProviderRegistry.register`. `detect` asks each registered provider, most
recently registered first, so an extension can claim a path before a built-in does.
"""

from __future__ import annotations

from collections.abc import Iterable

from meterproxy.providers.anthropic import AnthropicProvider
from meterproxy.providers.base import ParseResult, Provider, RequestInfo, UsageParser
from meterproxy.providers.batches import BatchResultsProvider
from meterproxy.providers.bedrock import BedrockProvider
from meterproxy.providers.gemini import GeminiProvider
from meterproxy.providers.openai import OpenAIProvider

__all__ = ["ParseResult", "Provider", "ProviderRegistry", "RequestInfo", "UsageParser"]


class ProviderRegistry:
    """The wire formats one application meters, asked most recently registered first.

    Each `meterproxy.proxy.Proxy` holds its own (an instance, not a module
    global), so a test or an embedding application can add or replace a
    provider without touching any other proxy in the process.
    """

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        self._providers: list[Provider] = []
        for provider in providers:
            self.register(provider)

    @classmethod
    def builtin(cls) -> ProviderRegistry:
        """OpenAI, Gemini and Anthropic, registered the way an extension would be."""
        # Order matters only where paths overlap: "/messages" is Anthropic, the OpenAI
        # suffixes never end in "/messages", Gemini's ":generateContent" is unique, Bedrock's
        # "/model/ID/converse" and "/invoke" are its own.
        return cls(
            (
                OpenAIProvider(),
                GeminiProvider(),
                AnthropicProvider(),
                BedrockProvider(),
                BatchResultsProvider("openai"),
                BatchResultsProvider("anthropic"),
            )
        )

    def register(self, provider: Provider) -> None:
        self._providers.insert(0, provider)

    def registered(self) -> list[Provider]:
        return list(self._providers)

    def detect(self, path: str) -> Provider | None:
        """The wire family of an upstream path (no query string), or None (forwarded unmetered)."""
        for provider in self._providers:
            if provider.matches(path):
                return provider
        return None

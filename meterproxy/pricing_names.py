"""Price lists and the names clients send: one provider vocabulary for the whole product.

A *price list* is whose prices a request is billed at. Rows, metrics, budgets
and price lists all use the names of `PRICE_LISTS` (``gemini``, not
``google``; ``xai``, not ``x-ai``); every other spelling a user or a data
source uses is an alias (`price_list`), so ``prices list --provider google``
and an upstream named ``google`` both mean ``gemini``. Each list says which
genai-prices providers form its base layer; curated and operator pricing
files join the list their ``provider =`` names (aliases included).

`client_spellings` gives the other spellings a name is retried under when the
name as sent matches nothing on the list: the Gemini API's ``models/`` prefix,
Bedrock's cross-region inference profiles (``us.``, ``eu.``, ``apac.``,
``global.`` ...), the list's own provider before the model (``openai/gpt-4-turbo`` on
OpenAI, ``google/`` or ``gemini/`` on the Gemini API), Vertex AI's ``google/`` (its
OpenAI-compatible endpoint) and ``publishers/google/models/`` (resource names), Azure's
``gpt-35-turbo`` for ``gpt-3.5-turbo`` (and ``azure/`` or ``openai/`` before a deployment's
model name), Mistral's
``-YYMM`` versions and ``-latest`` for the family (``pixtral-12b-2409``). Only
spellings of the *same* model on the *same* list: nothing here moves a name to
another provider's prices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PRICE_LISTS", "PriceList", "canonical", "client_spellings", "price_list"]


@dataclass(frozen=True, slots=True)
class PriceList:
    name: str  # the one name used everywhere (rows, metrics, budgets, price tables)
    base: tuple[str, ...]  # genai-prices provider ids, searched in order
    aliases: tuple[str, ...] = ()


PRICE_LISTS: tuple[PriceList, ...] = (
    PriceList("openai", ("openai",)),
    PriceList("anthropic", ("anthropic",), ("claude",)),
    PriceList("gemini", ("google",), ("google", "google-gla", "google-ai", "gemini-api")),
    PriceList("vertex", ("google",), ("vertex-ai", "vertexai", "google-vertex", "google-vertex-ai")),
    PriceList("azure", ("azure",), ("azure-openai", "azure_openai", "azureopenai")),
    PriceList("bedrock", ("aws",), ("aws", "amazon", "aws-bedrock", "amazon-bedrock")),
    PriceList("xai", ("x-ai",), ("x-ai", "grok")),
    PriceList("mistral", ("mistral",), ("mistralai", "mistral-ai")),
    PriceList("groq", ("groq",)),
    PriceList("deepseek", ("deepseek",)),
    PriceList("openrouter", ("openrouter",)),
    PriceList("together", ("together",), ("together-ai", "together_ai", "togetherai")),
    PriceList("fireworks", ("fireworks",), ("fireworks-ai", "fireworks_ai", "fireworksai")),
    PriceList("perplexity", ("perplexity",), ("pplx",)),
    PriceList("cohere", ("cohere",)),
)
_BY_NAME = {n: pl for pl in PRICE_LISTS for n in (pl.name, *pl.aliases)}


def canonical(name: str) -> str:
    """The vocabulary's name for provider `name` (``google`` -> ``gemini``); unknown names as given."""
    key = name.strip().lower()
    found = _BY_NAME.get(key)
    return found.name if found is not None else key


def price_list(name: str | None, base_ids: frozenset[str], files: frozenset[str]) -> PriceList | None:
    """The price list `name` means, or None when nobody publishes one under that name.

    Known names and aliases first; then a genai-prices provider id (``cerebras``)
    or a provider that a loaded pricing file declares (``vllm``) is a list of its own.
    """
    if not name:
        return None
    key = name.strip().lower()
    found = _BY_NAME.get(key)
    if found is not None:
        return found
    if key in base_ids or key in files:
        return PriceList(key, (key,) if key in base_ids else ())
    return None


_BEDROCK_PROFILE = re.compile(r"^(?:us|eu|apac|global|us-gov|ca|jp|au|sa)\.(?=[a-z0-9-]+\.)")
_AZURE = (("gpt-35-", "gpt-3.5-"),)
# The list's own provider before the model ("openai/gpt-4-turbo" on OpenAI, "google/..." on the
# Gemini API): gateway-style clients (LiteLLM, AI SDK registries) name models that way. Curated
# tables already strip a provider prefix on its own list; this gives base-layer models the same.
# Only where the prefix cannot be part of the list's own ids: not Groq, Together, Fireworks,
# OpenRouter (vendor-prefixed ids) nor Perplexity ("perplexity/sonar" is its own model).
# LiteLLM-style clients prefix the provider ("azure/gpt-4o", "openai/gpt-4o") on an Azure upstream.
# Vertex AI's OpenAI-compatible endpoint names Gemini models "google/<model>"; its REST resource
# names are "publishers/google/models/<model>". Both mean <model> on the same list.
_OWN_PREFIXES = {
    "openai": ("openai/",),
    "anthropic": ("anthropic/",),
    "gemini": ("google/", "gemini/"),
    "vertex": ("publishers/google/models/", "google/"),
    "azure": ("azure/", "openai/"),
    "mistral": ("mistralai/", "mistral/"),
    "xai": ("x-ai/", "xai/"),
    "deepseek": ("deepseek/",),
    "cohere": ("cohere/",),
}
# Mistral versions models as -YYMM (pixtral-12b-2409) and moves -latest; both name the family.
_MISTRAL_VERSION = re.compile(r"-(?:\d{4}|latest)$")


def client_spellings(name: str, price_list_name: str) -> list[str]:
    """Other spellings of lower-cased `name` to retry on the same list, in order.

    A prefix (``models/``, the list's own provider) is stripped first, and the other
    rewrites apply to the name with and without it (``mistralai/pixtral-12b-2409``).
    """
    prefixes = ("models/", *_OWN_PREFIXES.get(price_list_name, ()))
    bare = [name[len(p) :] for p in prefixes if name.startswith(p)]
    out: list[str] = []
    for n in (name, *bare):
        out.append(n)
        out += _rewrites(n, price_list_name)
    # In order, once each, without the name as sent.
    return [n for n in dict.fromkeys(out) if n != name]


def _rewrites(name: str, price_list_name: str) -> list[str]:
    out: list[str] = []
    if price_list_name == "bedrock" and (stripped := _BEDROCK_PROFILE.sub("", name)) != name:
        out.append(stripped)
        if stripped.startswith("arn:"):
            out.append(stripped.rsplit("/", 1)[-1])
    if price_list_name in ("azure", "openai"):
        for azure, openai in _AZURE:
            if name.startswith(azure):
                out.append(openai + name[len(azure) :])
    if price_list_name == "mistral" and (family := _MISTRAL_VERSION.sub("", name)) != name:
        out.append(family)
    return out

"""Models' output limits: the most tokens one answer can generate, for reserve budgets.

A reserve budget holds a request's worst case before forwarding it. A request
that sets no output limit (``max_tokens`` and its kin) can generate up to its
model's own limit, which ranges from 4,096 tokens to 128,000: a fixed default
either over-reserves small models or, worse, under-reserves the large ones and
lets a "hard" limit be passed. ``pricing/limits/output_tokens.toml`` lists the
limits by the price tables' model id, so a dated snapshot or an alias finds its
model's limit the way it finds its price (`PriceBook.resolve`). A model that is
not listed gets ``budget_reserve_output_tokens``.

The table's sections (``[openai]``, ``[anthropic]``...) only group it for
readers: ids are unique across the price tables' providers. A Bedrock model id
(``us.anthropic.claude-sonnet-4-20250514-v1:0``) finds the limit of the vendor's
model it names.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

from meterproxy.pricing import DEFAULT_PRICING_DIR, PriceBook
from meterproxy.providers.bedrock import vendor_model

__all__ = ["OUTPUT_LIMITS_FILE", "load_output_limits", "output_limit"]

OUTPUT_LIMITS_FILE = DEFAULT_PRICING_DIR / "limits" / "output_tokens.toml"


@functools.cache
def load_output_limits(path: Path = OUTPUT_LIMITS_FILE) -> dict[str, int]:
    """``{model id: max output tokens}`` from the table (ValueError on a value that is not one)."""
    with path.open("rb") as f:
        doc = tomllib.load(f)
    limits: dict[str, int] = {}
    for section, models in doc.items():
        if not isinstance(models, dict):
            raise ValueError(f"{path}: [{section}] must be a table of model = tokens")
        for model, tokens in models.items():
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
                raise ValueError(f"{path}: {model} = {tokens!r} is not a positive token count")
            limits[model] = tokens
    return limits


def output_limit(book: PriceBook, model: str | None, provider: str | None) -> int | None:
    """The most output tokens ``model`` can generate in one answer, or None when not known."""
    if not model:
        return None
    limits = load_output_limits()
    for name in (model, vendor_model(model)):  # a Bedrock id names its vendor's model inside
        # The id on the request's price list, else on the vendor's own (a router's or a cloud's
        # list names the model its own way), else the name as sent.
        for resolved in (book.resolve(name, provider), book.resolve(name), name):
            if resolved is not None and resolved in limits:
                return limits[resolved]
    return None

"""Write ``genai-prices.json`` (the base price layer) from the installed genai-prices package.

    python pricing/base/generate.py            # rewrites pricing/base/genai-prices.json

The output is genai-prices' own published data format (``prices/new_data/v2/data.json``,
what its ``UpdatePrices`` downloads), so ``meterproxy prices update`` accepts the same kind
of file and one reader (`meterproxy.pricing_base`) handles both. It is written from the
package's bundled data because that is the version pinned in ``pyproject.toml`` (the test
oracle) and needs no network. Usage extractors and long descriptions are dropped (the
proxy has its own parsers); everything that prices a request is kept, numbers exactly as
the package has them. Review the diff of the JSON like any price change.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from datetime import date, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
from genai_prices import types
from genai_prices.data import providers

OUT = Path(__file__).with_name("genai-prices.json")
_DROP = {"extractors", "description", "price_comments", "context_window"}
_NUM = "\x00num:"


def _clause(c: Any) -> Any:
    if isinstance(c, types.ClauseOr):
        return {"or": [_clause(x) for x in c.or_]}
    if isinstance(c, types.ClauseAnd):
        return {"and": [_clause(x) for x in c.and_]}
    ((key, value),) = dataclasses.asdict(c).items()
    return {key: value}


def _value(v: Any) -> Any:
    if isinstance(v, Decimal):
        return _NUM + format(v, "f")
    if isinstance(v, types.TieredPrices):
        return {
            "base": _value(v.base),
            "tiers": [{"start": t.start, "price": _value(t.price)} for t in v.tiers],
        }
    if isinstance(v, (date, time)):
        return v.isoformat()
    return v


def _prices(p: types.ModelPrice) -> dict[str, Any]:
    return {k: _value(v) for k, v in p.__dict__.items() if v is not None and not k.startswith("_")}


def _constraint(c: Any) -> Any:
    if c is None:
        return None
    if isinstance(c, types.StartDateConstraint):
        return {"start_date": c.start_date.isoformat()}
    return {"start_time": c.start_time.isoformat(), "end_time": c.end_time.isoformat()}


def _model(m: types.ModelInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"id": m.id}
    if m.name:
        out["name"] = m.name
    out["match"] = _clause(m.match)
    if m.deprecated:
        out["deprecated"] = True
    if isinstance(m.prices, types.ModelPrice):
        out["prices"] = _prices(m.prices)
    else:
        conds = []
        for cp in m.prices:
            item: dict[str, Any] = {}
            if cp.constraint is not None:
                item["constraint"] = _constraint(cp.constraint)
            item["prices"] = _prices(cp.prices)
            conds.append(item)
        out["prices"] = conds
    if m.price_variants:
        variants = []
        for pv in m.price_variants:
            item = {"when": dict(pv.when), "prices": _prices(pv.prices)}
            if pv.constraint is not None:
                item["constraint"] = _constraint(pv.constraint)
            variants.append(item)
        out["price_variants"] = variants
    return out


def _provider(p: types.Provider) -> dict[str, Any]:
    out: dict[str, Any] = {"id": p.id, "name": p.name, "pricing_urls": p.pricing_urls or []}
    out["api_pattern"] = p.api_pattern
    if p.model_match is not None:
        out["model_match"] = _clause(p.model_match)
    if p.provider_match is not None:
        out["provider_match"] = _clause(p.provider_match)
    if p.fallback_model_providers:
        out["fallback_model_providers"] = p.fallback_model_providers
    out["models"] = [_model(m) for m in p.models]
    return {k: v for k, v in out.items() if k not in _DROP}


def main() -> None:
    doc = [_provider(p) for p in providers]
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    # Decimals were carried as marked strings; write them as bare JSON numbers.
    text = re.sub(r'"\\u0000num:(-?[0-9.]+)"', r"\1", text)
    OUT.write_text(text + "\n", encoding="utf-8")
    models = sum(len(p["models"]) for p in doc)
    print(f"wrote {OUT} from genai-prices {genai_prices.__version__}: {len(doc)} providers, {models} models")


if __name__ == "__main__":
    sys.exit(main())

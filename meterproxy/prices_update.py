"""``meterproxy prices update``: newer base prices without a release, never rewriting the past.

The base layer (`meterproxy.pricing_base`) ships as ``pricing/base/genai-prices.json``.
An update is a newer genai-prices data file of the same format (the URL genai-prices'
own updater downloads, ``DEFAULT_URL``, or a file for offline machines), installed into
the prices directory as ``<applied-at>.json``; the time it was applied is in the name.

What an installed update changes, and what it cannot:

- it is **validated** before it is installed: it must parse, carry at least half as
  many models as the layer it updates, and keep every provider of the lists meterproxy
  names (a truncated download is refused, naming the problem);
- it is **in force from the moment it was applied**: `meterproxy.pricing.PriceBook`
  layers it over the shipped file and the curated corrections from that instant on,
  and only for the models whose price it changes. A request made before an update is
  priced, and repriced, as before: a billed period is never rewritten;
- a running ``serve`` notices a new file within seconds (`meterproxy.prices_watch`
  polls the directory) and swaps its price book without a restart.

`plan` says what an update would change (added, removed, changed rates in force at
the update time) before anything is written; the command prints it.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from meterproxy.pricing import DEFAULT_PRICING_DIR, BaseLayer, PriceBook, shipped_base
from meterproxy.pricing_base import BaseData, read_base
from meterproxy.pricing_load import PriceEntry, PricingError
from meterproxy.pricing_names import PRICE_LISTS

__all__ = [
    "DEFAULT_URL",
    "UpdatePlan",
    "base_layers",
    "fetch",
    "install",
    "installed",
    "load_book",
    "plan",
    "stage",
]

DEFAULT_URL = (
    "https://raw.githubusercontent.com/pydantic/genai-prices/refs/heads/main/prices/new_data/v2/data.json"
)
_NAME = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)\.json$")
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_MAX_BYTES = 64 * 1024 * 1024


def installed(prices_dir: Path) -> list[tuple[Path, datetime]]:
    """Installed update files, oldest first, with the time each was applied."""
    if not prices_dir.is_dir():
        return []
    out = []
    for path in prices_dir.iterdir():
        if m := _NAME.match(path.name):
            out.append((path, datetime.strptime(m[1], _STAMP).replace(tzinfo=UTC)))
    return sorted(out, key=lambda pair: pair[1])


@lru_cache(maxsize=16)
def _read(path: Path, mtime_ns: int) -> BaseData:
    return read_base(path)


def base_layers(prices_dir: Path | None) -> list[BaseLayer]:
    """The shipped base, then every installed update in the order they were applied."""
    layers: list[BaseLayer] = [(shipped_base(), None)]
    for path, at in installed(prices_dir) if prices_dir is not None else []:
        layers.append((_read(path, path.stat().st_mtime_ns), at))
    return layers


def load_book(overrides: Sequence[Path] = (), prices_dir: Path | None = None) -> PriceBook:
    """The price book ``serve`` prices with: base + installed updates, curated, `overrides`."""
    return PriceBook.load((DEFAULT_PRICING_DIR,), overrides, base_layers(prices_dir))


def fetch(source: str, timeout: float = 30.0) -> tuple[bytes, str]:
    """The bytes of `source` (a path, ``file://``, or an ``http(s)://`` URL) and its name."""
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            raw: bytes = response.read(_MAX_BYTES + 1)
    else:
        path = Path(source.removeprefix("file://"))
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PricingError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_BYTES:
        raise PricingError(f"{source}: larger than {_MAX_BYTES // 2**20} MiB; not a price data file")
    return raw, source


@dataclass(frozen=True, slots=True)
class Change:
    model: str  # genai-prices "provider/model"
    before: PriceEntry | None
    after: PriceEntry | None


@dataclass(slots=True)
class UpdatePlan:
    """What installing a data file at `at` changes in the base layer."""

    at: datetime
    data: BaseData
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0
    problems: list[str] = field(default_factory=list)  # refuse to install when non-empty

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def plan(new: BaseData, layers: Sequence[BaseLayer], at: datetime) -> UpdatePlan:
    """Compare `new` with the newest installed layer, at time `at`."""
    current = layers[-1][0]
    out = UpdatePlan(at, new)
    if new.model_count() < current.model_count() // 2:
        out.problems.append(
            f"{new.origin}: {new.model_count()} models, fewer than half of the {current.model_count()} "
            "in force (truncated or not a full data file)"
        )
    needed = {pid for plist in PRICE_LISTS for pid in plist.base}
    missing = sorted(needed - set(new.providers))
    if missing:
        out.problems.append(f"{new.origin}: providers missing: {', '.join(missing)}")
    old_models = _models(current)
    new_models = _models(new)
    for key in sorted(old_models.keys() | new_models.keys()):
        before = _in_force(old_models.get(key, ()), at)
        after = _in_force(new_models.get(key, ()), at)
        later_new = [e for e in new_models.get(key, ()) if e.effective_from > at]
        change = Change(key, before, after)
        if before is None and after is not None:
            out.added.append(change)
        elif after is None and before is not None:
            out.removed.append(change)
        elif before is not None and after is not None and (not before.same_prices(after) or later_new):
            out.changed.append(change)
        else:
            out.unchanged += 1
    return out


def stage(raw: bytes, prices_dir: Path) -> Path:
    """Write `raw` to a hidden file in `prices_dir` (fsynced), for `install` to rename into place."""
    prices_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=prices_dir, prefix=".incoming-", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(tmp)


def install(staged: Path, update: UpdatePlan, prices_dir: Path) -> Path:
    """Rename the staged file to ``<applied-at>.json``, atomically; a running ``serve`` then loads it."""
    if update.problems:
        raise PricingError("; ".join(update.problems))
    target = prices_dir / f"{update.at.astimezone(UTC).strftime(_STAMP)}.json"
    os.replace(staged, target)
    return target


def _models(data: BaseData) -> dict[str, tuple[PriceEntry, ...]]:
    return {f"{p.id}/{m.id}": m.entries for p in data.providers.values() for m in p.models}


def _in_force(entries: Sequence[PriceEntry], at: datetime) -> PriceEntry | None:
    found = None
    for e in entries:
        if e.effective_from > at:
            break
        found = e
    return found

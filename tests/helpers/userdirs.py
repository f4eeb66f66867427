"""Never touch the real user's home: data dir, state, config, caches (Chromium's crash reports too).

The suite's autouse fixture applies `isolate_user_dirs` to every test's temp dir;
fixtures that outlive one test (the session's Chromium, a module's ``meterproxy
serve``) are set up before it, so they apply it themselves to their own temp dir
while they start their processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["isolate_user_dirs"]


def isolate_user_dirs(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point ``HOME`` and the XDG directories below ``root``; drop meterproxy's own variables."""
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "xdg-state"))
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for name in ("METERPROXY_DB", "METERPROXY_ADMIN_TOKEN", "METERPROXY_CONFIG", "METERPROXY_UPSTREAMS"):
        monkeypatch.delenv(name, raising=False)

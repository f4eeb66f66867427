"""One Chromium for the whole test session; each browser test gets fresh contexts from it.

Starting Playwright's driver and Chromium costs about a second, and the page tests
number about thirty, so they share one browser instead of launching their own.
Isolation comes from browser contexts: each test opens its own (cookies, storage,
cache, viewport and time zone are per context) and every context it opened is
closed when it ends, so no page of one test keeps polling while another runs.

Playwright's connection belongs to the event loop that started it, so the browser
tests run in pytest-asyncio's session loop (`SESSION_LOOP`, in their
``pytestmark``), and every async fixture they use must run in that loop too:
``tests/helpers/dashboard.py`` has the session-loop twins of the suite's `upstream`
and `make_proxy` (the same code, ``tests/conftest.py``'s `proxy_factory`).
``tests/conftest.py`` registers `chromium` and `browser` for the whole suite, so
the one browser is shared by every module.

Chromium writes crash reports and caches under ``$HOME``: it gets a directory of
the session's temp dir, never the real home.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import async_playwright

from tests.helpers.userdirs import isolate_user_dirs

__all__ = ["ARGS", "CHROMIUM", "SESSION_LOOP", "browser", "chromium", "chromium_home"]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: The mark that runs a browser test in the session's event loop, where the shared browser lives.
SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="session")
def chromium_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``$HOME`` the session's Chromium writes its crash reports and caches to."""
    return tmp_path_factory.mktemp("chromium") / "home"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium(chromium_home: Path) -> AsyncIterator[Any]:
    """Debian's Chromium, driven by Playwright, launched once for the session."""
    # Set up before any test's own isolation: Playwright's driver and Chromium get the same here.
    with pytest.MonkeyPatch.context() as mp:
        isolate_user_dirs(mp, chromium_home.parent)
        env = dict(os.environ)
        playwright = await async_playwright().start()
    try:
        b = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, env=env)
        try:
            yield b
        finally:
            await b.close()
    finally:
        await playwright.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def browser(chromium: Any) -> AsyncIterator[Any]:
    """The shared browser; every context the test opens is closed after it."""
    try:
        yield chromium
    finally:
        for context in chromium.contexts:
            await context.close()

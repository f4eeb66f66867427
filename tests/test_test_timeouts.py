"""Every official SDK client a test builds waits ``SDK_TIMEOUT`` (``tests/helpers/sdk.py``).

The SDKs' own connect timeout is 5 s, and on a machine running the suite beside other work a
connect to 127.0.0.1 has taken longer (CI failed so). A client built without ``timeout=`` is a
flake waiting for a busy day; this check finds one when it is written, not when CI is busy.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent

#: The SDK client classes the tests build (OpenAI's and Anthropic's; Google's has no short default).
CLIENTS = {
    "OpenAI",
    "AsyncOpenAI",
    "AzureOpenAI",
    "AsyncAzureOpenAI",
    "Anthropic",
    "AsyncAnthropic",
    "AnthropicBedrock",
    "AsyncAnthropicBedrock",
    "AnthropicVertex",
    "AsyncAnthropicVertex",
}


def clients_without_timeout(source: str) -> list[int]:
    """Lines of ``source`` that build an SDK client without a ``timeout=`` argument."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        explicit = {k.arg for k in node.keywords}
        if name in CLIENTS and "timeout" not in explicit and None not in explicit:  # None: **kwargs
            lines.append(node.lineno)
    return lines


def test_the_check_sees_each_spelling() -> None:
    source = (
        "import openai\nfrom anthropic import AsyncAnthropic\n"
        "a = openai.AsyncOpenAI(base_url=u)\n"
        "b = AsyncAnthropic(\n    base_url=u,\n)\n"
        "c = openai.OpenAI(timeout=SDK_TIMEOUT, base_url=u)\n"
        "d = openai.AsyncOpenAI(**options)\n"
        "e = httpx.AsyncClient(base_url=u)\n"
    )
    assert clients_without_timeout(source) == [3, 4]


def test_every_sdk_client_in_the_tests_has_a_timeout() -> None:
    found = {
        f"{path.relative_to(TESTS)}:{line}"
        for path in TESTS.rglob("*.py")
        for line in clients_without_timeout(path.read_text())
    }
    assert not found, "pass timeout=SDK_TIMEOUT (tests/helpers/sdk.py)"

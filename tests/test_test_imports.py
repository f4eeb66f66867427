"""Test modules import shared helpers from ``tests/helpers/``, never from another test module.

A helper living in a test module drags that module's tests, fixtures and
import-time work along with it, and a second copy grows when the next test
cannot find it. Conftest files hold fixtures (the root one also the harness
types, ``ProxyHarness``...); helpers other modules need go to ``tests/helpers/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent

#: Imports still to move, each with its reason.
KNOWN = {
    # The price-list work edits this table often; it moves to tests/helpers/ when that settles.
    ("test_pricing_coverage.py", "tests.test_pricing_genai"),
}


def imported_test_modules(source: str) -> list[str]:
    """The test modules, and conftests other than the root one, that ``source`` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            last = name.rsplit(".", 1)[-1]
            test_module = last.startswith("test_") or last == "conftest"
            if name.startswith("tests.") and test_module and name != "tests.conftest":
                found.add(name)
    return sorted(found)


def test_the_check_sees_each_spelling() -> None:
    source = (
        "from tests.test_durability import Served\n"
        "from tests import test_dashboard as dashboard\n"
        "import tests.test_export\n"
        "from tests.faults.conftest import post\n"
        "from tests.conftest import ProxyHarness\n"
        "from tests.helpers.served import Served\n"
    )
    assert imported_test_modules(source) == [
        "tests.faults.conftest",
        "tests.test_dashboard",
        "tests.test_durability",
        "tests.test_export",
    ]


def test_no_test_module_imports_another() -> None:
    found = {
        (str(path.relative_to(TESTS)), name)
        for path in TESTS.rglob("*.py")
        for name in imported_test_modules(path.read_text())
    }
    assert found - KNOWN == set(), "import these from tests/helpers/ instead"
    assert found >= KNOWN, "an import listed in KNOWN is gone: drop it from the list"

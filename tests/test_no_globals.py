"""No module-level registries: state lives on the app (or the object that owns it), never in a module.

STYLE.md habit 6: resources have lifecycles, not globals. A module-level list
or dict that functions fill (the migration registry once was) makes what a
process does depend on what it happened to import, leaks between the apps a
test runs in one process, and outlives the app that opened it. This reads every
module of the package and fails on a function that mutates a module-level
container (``NAME.append(...)``, ``NAME[key] = ...``) or rebinds a module name
with ``global``. Constant tables built at import time are fine: only mutation
from inside a function is flagged. Not caught: a module-level instance of a
class that keeps state (the PostgreSQL read pools were ``POOLS = ReadPools()``);
`tests/test_store_backends.py` checks that each app owns and closes its pool.
"""

from __future__ import annotations

import ast
from pathlib import Path

import meterproxy

PACKAGE = Path(meterproxy.__file__).parent
MUTATORS = {
    "append",
    "add",
    "update",
    "setdefault",
    "pop",
    "popitem",
    "clear",
    "extend",
    "insert",
    "remove",
    "discard",
}
CONTAINERS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
FACTORIES = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque"}


def _module_containers(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        factory = (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in FACTORIES
        )
        if isinstance(value, CONTAINERS) or factory:
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def module_state_mutations(source: str) -> list[str]:
    """``function: what`` for each mutation of module-level state from inside a function."""
    tree = ast.parse(source)
    containers = _module_containers(tree)
    found: list[str] = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found.append(f"{fn.name}: global {', '.join(node.names)}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in containers
            ):
                found.append(f"{fn.name}: {node.func.value.id}.{node.func.attr}(...)")
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
                found += [
                    f"{fn.name}: {t.value.id}[...] changed"
                    for t in targets
                    if isinstance(t, ast.Subscript)
                    and isinstance(t.value, ast.Name)
                    and t.value.id in containers
                ]
    return found


def test_the_check_finds_a_registry() -> None:
    """The migration registry as it was: the check must flag it."""
    old = (
        "_REGISTERED: list[object] = []\n"
        "def register_migrations(m):\n"
        "    _REGISTERED.append(m)\n"
        "    return m\n"
        "_CACHE = {}\n"
        "def remember(k, v):\n"
        "    _CACHE[k] = v\n"
        "def swap(x):\n"
        "    global POOL\n"
        "    POOL = x\n"
    )
    assert module_state_mutations(old) == [
        "register_migrations: _REGISTERED.append(...)",
        "remember: _CACHE[...] changed",
        "swap: global POOL",
    ]
    # A constant table, and a container local to a function, are not state.
    assert module_state_mutations("T = {'a': 1}\ndef f():\n    t = {}\n    t['b'] = T['a']\n") == []


def test_no_module_mutates_module_level_state() -> None:
    problems = [
        f"{path.relative_to(PACKAGE.parent)}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for what in module_state_mutations(path.read_text())
    ]
    assert problems == [], "module-level state (hold it on the app or its owner instead):\n" + "\n".join(
        problems
    )

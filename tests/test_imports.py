"""The package's import structure: every module imports on its own, and no two import each other.

A cycle hidden by an import inside a function still ties the two modules together (each must
know the other to be read), so the graph counts imports at any depth, not only at the top. It
counts the imports written in the code; the implicit import of a module's parent package, which
Python always finishes first, is not an edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cachedload

PACKAGE = Path(cachedload.__file__).parent
MODULES = sorted(
    ".".join(("cachedload", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for path in PACKAGE.rglob("*.py")
)


def _module_file(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its code."""
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = _imports_in(path.read_text(encoding="utf-8"), package)
    return {name for name in found if name in MODULES and name != module}


def _imports_in(source: str, package: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``source`` needs, at any depth
    (``package``: the one relative imports start from)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parts, base]))
            for alias in node.names:
                # "from cachedload import store" needs the module cachedload.store; "from
                # cachedload import __version__" needs the package's __init__.
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each as a path ``a -> ... -> a`` starting at its smallest name."""
    found: list[list[str]] = []

    def extend(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt > path[0] and nxt not in path:
                extend([*path, nxt])

    for start in sorted(graph):
        extend([start])
    return found


def test_the_module_list_is_complete() -> None:
    assert {"cachedload", "cachedload.fingerprint", "cachedload.backends.objects"} <= set(MODULES)


def test_every_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]


def test_imports_inside_functions_and_relative_ones_count() -> None:
    source = """
import cachedload.errors
from cachedload import config, __version__

def f():
    from cachedload.backends.mount import lease_seconds
    from . import lease
    from ..store import Store
"""
    assert _imports_in(source, "cachedload.backends") == {
        "cachedload.errors",
        "cachedload.config",
        "cachedload",
        "cachedload.backends.mount",
        "cachedload.backends.lease",
        "cachedload.store",
    }


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_package_has_no_import_cycle() -> None:
    graph = {module: _imported(module) for module in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)

"""No import cycles inside the tunelab package, counting the imports hidden inside functions.

Every module of the package is parsed with `ast` (nothing is imported, so a cycle cannot hide behind
import order) and each `import tunelab.x` / `from tunelab.x import y` / relative import anywhere in it
(module top, functions, methods) becomes an edge module -> module. Imports under `if TYPE_CHECKING:` are
left out: they never run. A module reaching its own package's `__init__` (or a package importing its own
submodules) is not a cycle: Python loads a package before its submodules anyway.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import tunelab

PACKAGE = "tunelab"


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name -> source file (packages as their __init__.py)."""
    root = Path(tunelab.__file__).parent
    modules = {PACKAGE: root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix=f"{PACKAGE}."):
        parts = info.name.split(".")[1:]
        path = root.joinpath(*parts)
        modules[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(node: ast.AST):
    """Import nodes anywhere under `node` except inside `if TYPE_CHECKING:` blocks (their else still runs)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
    for child in children:
        yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, module, path.name == "__init__.py")
        found.add(source)  # `from pkg import submodule` imports the submodule, else a name of pkg itself
        found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known)
    return {name for name in found if name in known}


def _own_package(module: str, target: str) -> bool:
    """True when one is a package that holds the other (tunelab.study <-> tunelab.study.spec)."""
    return module.startswith(target + ".") or target.startswith(module + ".")


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: {t for t in imported_modules(name, path, known) if t != name and not _own_package(name, t)}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_walk_sees_imports_inside_functions_and_subpackages():
    graph = import_graph()
    assert "tunelab.study.runner" in graph and "tunelab.model" in graph
    assert "tunelab.train" in graph["tunelab.study.runner"]  # imported inside a function only
    assert "tunelab.errors" in graph["tunelab.model"]  # a top-level `from tunelab.errors import ...`
    assert "tunelab.hparams" not in graph["tunelab.model"]  # only under TYPE_CHECKING: never runs


def test_find_cycle_names_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_package_imports_resolve_to_modules(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from . import spec\nfrom .results import x\nimport tunelab.hparams as h\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tunelab import model\n"
                   "def f():\n    from tunelab import data\n", encoding="utf-8")
    known = {"tunelab", "tunelab.study", "tunelab.study.spec", "tunelab.study.results", "tunelab.hparams",
             "tunelab.model", "tunelab.data"}
    found = imported_modules("tunelab.study.m", src, known)
    assert found == {"tunelab.study", "tunelab.study.spec", "tunelab.study.results", "tunelab.hparams",
                     "tunelab", "tunelab.data"}

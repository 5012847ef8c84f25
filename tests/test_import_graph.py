"""The package's modules import each other without a circle, counting the imports made
inside functions too (a deferred import hides a circle; it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "codi_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from .x import y``
    counts ``x``, and ``x.y`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target in modules:
                found.add(target)
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def package_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    # a package's __init__ re-exports its modules: importing from the package is not
    # importing the package's own modules back, so edges into an __init__ from inside
    # that package are left out (they are the re-exports, not a dependency)
    graph = {}
    for p in paths:
        name = module_name(p)
        edges = imports_of(p, modules)
        if p.name != "__init__.py":
            edges = {e for e in edges if not name.startswith(e + ".")}
        graph[name] = edges
    return graph


def test_no_module_imports_itself_back():
    assert cycles(package_graph()) == []


def test_the_cycle_finder_finds_a_deferred_import_circle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_product_code_does_not_import_the_test_fixtures():
    """``codi_lightning.testing`` (tiny teacher folders) is for tests and benchmarks: no
    other module of the package imports it, deferred imports included."""
    fixtures = "codi_lightning.testing"
    importers = {
        name: sorted(e for e in edges if e == fixtures or e.startswith(fixtures + "."))
        for name, edges in package_graph().items()
        if not (name == fixtures or name.startswith(fixtures + "."))
    }
    assert {name: found for name, found in importers.items() if found} == {}

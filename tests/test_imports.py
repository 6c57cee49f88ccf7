"""No import cycle inside spectra_gpu, checked on the source with ``ast`` (relative imports resolved):

1. The module-level import graph of every module under the package is acyclic. Imports inside functions run
   at call time, after every module has loaded, so they are lazy and allowed there; so are imports under
   ``if TYPE_CHECKING:``. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when that is a
   module, else to the package ``pkg`` itself.
2. The layers (each subpackage such as ``spectra_gpu.ops``, and each top-level module) form a DAG counting
   every import, lazy ones included: a lazy import may defer loading (triton, cupy, the kernels), not hide a
   cycle between layers, such as ops -> backends -> ops before issue 12. Imports of the root package
   ``spectra_gpu`` (the public facade) do not count."""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spectra_gpu"


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: top level, and inside module-level
    if/try/with blocks (not functions, not classes' methods, not ``if TYPE_CHECKING:``)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph(modules: dict[str, Path], *, lazy: bool = False) -> dict[str, set[str]]:
    """Edges module -> modules of the package it imports at module level (``lazy``: anywhere)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package relative imports start from
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in (_all_imports if lazy else _module_level_imports)(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import spectra_gpu.ops.knn_graph.x`: the longest module prefix
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_of(module: str, package: str = PACKAGE) -> str:
    """``pkg.sub.mod`` -> ``pkg.sub``; a top-level module is its own layer; the root package is ``pkg``."""
    return ".".join(module.split(".")[:2]) if module != package else package


def layer_graph(graph: dict[str, set[str]], package: str = PACKAGE,
                skip: Collection[tuple[str, str]] = ()) -> dict[str, set[str]]:
    """The module graph collapsed to layers, without edges into the root package or inside one layer. ``skip``:
    (module, layer) edges left out."""
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        la = layer_of(a, package)
        out.setdefault(la, set())
        for b in targets:
            lb = layer_of(b, package)
            if lb not in (la, package) and (a, lb) not in skip:
                out[la].add(lb)
    return out


def test_package_has_no_import_cycle():
    modules = module_names()
    assert f"{PACKAGE}.ops" in modules and len(modules) > 10, sorted(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_layers_have_no_cycle_counting_lazy_imports():
    layers = layer_graph(import_graph(module_names(), lazy=True))
    assert {f"{PACKAGE}.ops", f"{PACKAGE}.backends", f"{PACKAGE}.kernels", f"{PACKAGE}.scoring"} <= set(layers)
    cycle = find_cycle(layers)
    assert cycle is None, f"import cycle between layers (lazy imports included): {' -> '.join(cycle)}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_a_relative_import_cycle_and_allows_lazy_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .ops import a\n",
        "pkg/ops/__init__.py": "",
        "pkg/ops/a.py": "from ..backends import select\n",
        "pkg/backends/__init__.py": "from .registry import select\n",
        "pkg/backends/registry.py": "def select():\n    from . import impl\n",  # lazy: no edge
        "pkg/backends/impl.py": "from ..ops.a import x\n",
    })
    graph = import_graph(module_names(tmp_path, "pkg"))
    assert graph["pkg.ops.a"] == {"pkg.backends"}
    assert graph["pkg.backends.registry"] == set()
    assert find_cycle(graph) is None
    _write(tmp_path, {"pkg/backends/registry.py": "from . import impl\n"})  # now at module level
    graph = import_graph(module_names(tmp_path, "pkg"))
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.backends", "pkg.backends.registry", "pkg.backends.impl", "pkg.ops.a"}


def test_layer_checker_sees_a_cycle_closed_only_by_lazy_imports(tmp_path):
    _write(tmp_path, {  # the shape of spectra_gpu before issue 12: ops.knn <-> backends, both sides lazy or not
        "pkg/__init__.py": "from .ops import knn\n",
        "pkg/ops/__init__.py": "from .knn import knn_graph\n",
        "pkg/ops/knn.py": "def knn_graph():\n    from ..backends import select\n",
        "pkg/backends/__init__.py": "from .registry import select\n",
        "pkg/backends/registry.py": "def select():\n    from . import torch\n",
        "pkg/backends/torch.py": "from ..ops.knn import knn_graph\n",
    })
    graph = import_graph(module_names(tmp_path, "pkg"))
    assert find_cycle(graph) is None  # module level: every edge back is inside a function
    layers = layer_graph(import_graph(module_names(tmp_path, "pkg"), lazy=True), "pkg")
    assert layers == {"pkg": {"pkg.ops"}, "pkg.ops": {"pkg.backends"}, "pkg.backends": {"pkg.ops"}}
    assert find_cycle(layers) in (["pkg.backends", "pkg.ops", "pkg.backends"], ["pkg.ops", "pkg.backends", "pkg.ops"])


@pytest.mark.parametrize("source,edges", [
    ("import pkg.b\n", {"pkg.b"}),
    ("from pkg import b\n", {"pkg.b"}),
    ("from . import b, c\n", {"pkg.b", "pkg"}),  # c is no module: the name comes from pkg/__init__.py
    ("from .b import f\n", {"pkg.b"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import f\n", set()),
    ("try:\n    from .b import f\nexcept ImportError:\n    f = None\n", {"pkg.b"}),
])
def test_checker_resolves_import_forms(tmp_path, source, edges):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": source, "pkg/b.py": ""})
    assert import_graph(module_names(tmp_path, "pkg"))["pkg.a"] == edges

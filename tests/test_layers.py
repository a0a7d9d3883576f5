"""The package's imports go one way (docs/design.md, "Layers"): read from the source with ``ast``, never by importing it.

Every module of ``src/spikingbrain`` is parsed, its imports (also those inside functions)
resolved to modules of the package, and each import checked against the layer order: a module
may import its own layer and the layers below, never one above. No modules and no packages may
import each other in a circle. The checks run on hand-made edges too, so that they can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spikingbrain"

#: The layers from the bottom up; a module may import only its own layer and those listed before it.
LAYERS = ("ops", "spiking", "model", "runtime", "eval", "convert", "train", "bench", "serve", "distributed", "demo", "cli")
#: The package root re-exports model names (loaded on first use), so it sits in the model layer.
ROOT_LAYER = "model"


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line``; ``in_function`` when the import runs only inside a function."""

    importer: str
    imported: str
    line: int
    in_function: bool


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` named by its package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(base: str, name: str, modules: dict[str, Path]) -> str:
    """``base.name`` when that is a module (``from pkg import submodule``), else ``base``."""
    full = f"{base}.{name}" if base else name
    return full if full in modules else base


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The imports of ``module`` that name modules of the package, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                targets = [_resolve(base, alias.name, modules) for alias in child.names]
            for target in targets:
                if target.split(".")[0] == PACKAGE.name:
                    edges.append(Edge(module, target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return edges


def package_edges(root: Path = PACKAGE) -> list[Edge]:
    """Every import between modules of the package."""
    modules = module_names(root)
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]


def layer_of(module: str) -> str:
    """The layer of a dotted module name: its top-level package (or module) below ``spikingbrain``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_LAYER


def upward_imports(edges: list[Edge], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """One line for every import of a higher layer (or of a package outside the layer list)."""
    problems = []
    for edge in edges:
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        if low not in layers or high not in layers:
            problems.append(f"{edge.importer}:{edge.line} imports {edge.imported}: {low} or {high} is in no layer")
        elif layers.index(high) > layers.index(low):
            problems.append(f"{edge.importer}:{edge.line} imports {edge.imported}: layer {high} is above {low}")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (or a node importing itself), each sorted (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def graph_of(edges: list[Edge], key=lambda name: name, module_level_only: bool = False) -> dict[str, set[str]]:
    """``importer -> imported`` of ``edges`` with both ends mapped by ``key`` (self-edges of a mapped pair dropped)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if module_level_only and edge.in_function:
            continue
        a, b = key(edge.importer), key(edge.imported)
        if a != b or edge.importer == edge.imported:
            graph.setdefault(a, set()).add(b)
    return graph


def test_every_package_has_a_layer():
    packages = {layer_of(name) for name in module_names()}
    assert packages <= set(LAYERS), f"place {sorted(packages - set(LAYERS))} in LAYERS and in docs/design.md"


def test_no_module_imports_a_higher_layer():
    assert upward_imports(package_edges()) == []


def test_no_modules_import_each_other_in_a_circle():
    edges = package_edges()
    assert circles(graph_of(edges, module_level_only=True)) == []  # would fail at import time
    assert circles(graph_of(edges)) == []  # also through imports inside functions


def test_no_packages_import_each_other_in_a_circle():
    assert circles(graph_of(package_edges(), key=layer_of)) == []


def test_the_checks_find_upward_imports_and_circles_in_hand_made_edges():
    edges = [
        Edge("spikingbrain.eval.perplexity", "spikingbrain.bench.common", 18, False),  # eval below bench: upward
        Edge("spikingbrain.bench.demo", "spikingbrain.eval.passkey", 9, True),  # downward: allowed
        Edge("spikingbrain.ops.gla", "spikingbrain.extra.helpers", 3, False),  # a package in no layer
        Edge("spikingbrain.model.loading", "spikingbrain.model.shipped", 4, False),
        Edge("spikingbrain.model.shipped", "spikingbrain.model.loading", 80, True),
    ]
    assert upward_imports(edges) == [
        "spikingbrain.eval.perplexity:18 imports spikingbrain.bench.common: layer bench is above eval",
        "spikingbrain.ops.gla:3 imports spikingbrain.extra.helpers: ops or extra is in no layer",
    ]
    assert circles(graph_of(edges)) == [["spikingbrain.model.loading", "spikingbrain.model.shipped"]]
    assert circles(graph_of(edges, module_level_only=True)) == []  # the circle closes inside a function
    assert circles(graph_of(edges, key=layer_of)) == [["bench", "eval"]]
    assert circles({"a": {"a"}}) == [["a"]]


def test_imports_are_resolved_from_the_source(tmp_path):
    root = tmp_path / "spikingbrain"
    (root / "model").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model" / "__init__.py").write_text("from . import names\n")
    (root / "model" / "names.py").write_text("")
    (root / "model" / "loading.py").write_text(
        "import os\nfrom .names import SHORT_NAMES\n\ndef load():\n    from ..ops.gla import chunk_gla\n    import spikingbrain.cli\n"
    )
    found = sorted((e.importer, e.imported, e.in_function) for e in package_edges(root))
    assert found == [
        ("spikingbrain.model", "spikingbrain.model.names", False),
        ("spikingbrain.model.loading", "spikingbrain.cli", True),
        ("spikingbrain.model.loading", "spikingbrain.model.names", False),
        ("spikingbrain.model.loading", "spikingbrain.ops.gla", True),
    ]

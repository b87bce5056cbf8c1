"""fvlab's import graph, read from the source (ast): no cycle, and no module imports one above it.

Every import counts, the ones inside functions too: an import deferred into a function still ties
the two modules together, it only hides the tie until it runs. The layers are docs/architecture.md's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "fvlab"

# docs/architecture.md, "Which way the imports go": a module imports only from its own layer or below.
LAYERS: dict[str, int] = {
    "fvlab": 0, "fvlab.metrics": 0, "fvlab.runs": 0, "fvlab.runtime": 0, "fvlab.pareto": 0, "fvlab.stats": 0,
    "fvlab.tables": 0, "fvlab.adapters": 0, "fvlab.export": 0, "fvlab._argparse": 0, "fvlab.models": 0, "fvlab.data": 0,
    "fvlab.profile": 1, "fvlab.experiment": 1,
    "fvlab.lit": 2,
    "fvlab.sweep": 3,
    "fvlab.report": 4,
    "fvlab.cli": 5,
}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The fvlab modules one import statement loads (the longest known prefix of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join([*package, *([base] if base else [])])
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("fvlab"):
            found.append(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the fvlab modules it imports anywhere in its source (a package's own submodules aside)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(t for t in _imported(name, path, node, modules) if t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> int:
    """The layer of a module: that of its longest listed prefix."""
    name = module
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")
        name = name.rpartition(".")[0]
    return LAYERS[name]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for each import of a module in a higher layer than the importer's."""
    return [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
            if layer_of(b) > layer_of(a)]


def test_fvlab_has_no_import_cycle() -> None:
    assert find_cycles(import_graph()) == []


def test_no_module_imports_one_above_it_and_nothing_imports_the_cli() -> None:
    graph = import_graph()
    assert upward_imports(graph) == []
    assert [a for a, targets in graph.items() if "fvlab.cli" in targets] == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    # The same walk over a made-up package with both faults, deferred into functions.
    root = tmp_path / "fvlab"
    (root / "lit").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "lit" / "__init__.py").write_text("from .one import f\n")
    (root / "lit" / "one.py").write_text("def f():\n    from fvlab.lit import two\n")
    (root / "lit" / "two.py").write_text("from . import one\n")
    (root / "runs.py").write_text("def g():\n    import fvlab.lit.two\n")
    graph = import_graph(root)
    assert find_cycles(graph) == [["fvlab.lit.one", "fvlab.lit.two"]]
    assert upward_imports(graph) == ["fvlab.runs -> fvlab.lit.two"]


@pytest.mark.parametrize("module", ["fvlab.metrics", "fvlab.runs", "fvlab.pareto"])
def test_bottom_modules_import_nothing_of_a_higher_layer(module: str) -> None:
    assert all(layer_of(target) == 0 for target in import_graph()[module])

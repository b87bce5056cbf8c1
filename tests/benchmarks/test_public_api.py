"""benchmarks/ use fvlab's public API only, name metrics through fvlab.metrics, and keep functions short.

Read with ``ast``, nothing imported: a benchmark that reaches into a private name or patches an
fvlab module measures something fvlab's users cannot run, and breaks silently when it changes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
MAX_FUNCTION_LINES = 60
METRIC_LITERAL = re.compile(r"^(train|val|test|model)/\w")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_fvlab_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of fvlab's source tree (no import needed)."""
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _fvlab_module_names(tree: ast.Module) -> set[str]:
    """Local names bound to fvlab modules: ``import fvlab.x as y``, ``from fvlab.sweep import workers``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "fvlab")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fvlab":
            names.update(a.asname or a.name for a in node.names if _is_fvlab_module(f"{node.module}.{a.name}"))
    return names


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes (prose may name a metric)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def problems(source: str, name: str = "<source>") -> list[str]:
    """What breaks the rules in one benchmark's source, one line each."""
    tree = ast.parse(source)
    modules, docstrings, found = _fvlab_module_names(tree), _docstrings(tree), []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fvlab":
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{where}: imports from the private module {node.module}")
            found += [f"{where}: imports the private {node.module}.{a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{where}: imports the private module {a.name}" for a in node.names
                      if a.name.split(".")[0] == "fvlab" and any(_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append(f"{where}: patches {node.value.id}.{node.attr}")
            elif _private(node.attr):
                found.append(f"{where}: uses the private {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in modules:
            found.append(f"{where}: patches {node.args[0].id} with {node.func.id}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{where}: {node.name} is {lines} lines (at most {MAX_FUNCTION_LINES})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and METRIC_LITERAL.match(node.value):
            found.append(f"{where}: the metric {node.value!r} spelled out (use fvlab.metrics)")
    return found


def test_the_benchmarks_use_public_names_and_short_functions() -> None:
    assert BENCHMARKS
    found = [p for path in BENCHMARKS for p in problems(path.read_text(), path.name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, message", [
    ("from fvlab.sweep.command import _open_study\n", "private fvlab.sweep.command._open_study"),
    ("from fvlab._argparse import ArgumentParser\n", "private module fvlab._argparse"),
    ("from fvlab.sweep import workers\nworkers.make_pruner = None\n", "patches workers.make_pruner"),
    ("from fvlab.sweep import workers\nsetattr(workers, 'make_pruner', None)\n", "patches workers with setattr"),
    ("import fvlab.sweep.workers as w\nw._open_worker(None)\n", "private w._open_worker"),
    ("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES, "f is 61 lines"),
    ("OBJECTIVES = {'val/acc1_best': 'maximize'}\n", "'val/acc1_best' spelled out"),
])
def test_the_check_finds_each_kind_of_problem(source: str, message: str) -> None:
    assert any(message in p for p in problems(source)), problems(source)


def test_the_check_passes_public_use() -> None:
    source = ('"""Reads val/acc1_best."""\nfrom fvlab.metrics import VAL_ACC1_BEST\nfrom fvlab.sweep import workers\n'
              'def f():\n    """model/throughput in prose."""\n    return workers.run_workers(None, pruner_factory=None)\n')
    assert problems(source) == []

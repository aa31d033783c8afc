"""The package's layering, read from the source: the command line sits on top of the API.

Every import (module level or inside a function: a lazy import is still a dependency) of
every module in the ``edgekit`` namespace is collected with ``ast``; the tests fail on an
import cycle between modules, and on any module outside ``edgekit.cli`` that imports the
command line (the demo, the benchmarks and the stages call functions, never argv).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"edgekit": "edgekit", "edgekit.kernels": "kernels", "edgekit.calibration": "calibration",
            "edgekit.export": "export", "edgekit.benchmarks": "benchmarks"}
# Files that are not modules of the package (templates copied into deploy bundles).
NOT_MODULES = {"edgekit.export.infer_template"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(name == p or name.startswith(p + ".") for p in PACKAGES if p != package and p.startswith(package)):
                continue  # a folder mapped to another package
            found[name] = path
    return {n: p for n, p in found.items() if n not in NOT_MODULES}


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}
    return {t for t in targets if t in modules and t != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    assert len(modules) > 60, sorted(modules)  # the walk found the package, not an empty folder
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_nothing_below_the_command_line_imports_it(graph):
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if not m.startswith("edgekit.cli")
                       for t in targets if t == "edgekit.cli" or t.startswith("edgekit.cli."))
    assert offenders == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle(graph):
    planted = {k: set(v) for k, v in graph.items()}
    planted["edgekit.fileio"].add("edgekit.cli")  # the cycle the demo once made: cli -> ... -> cli
    assert any("edgekit.cli" in c and "edgekit.fileio" in c for c in _cycles(planted))


def test_the_cli_modules_only_map_flags_to_configs(graph):
    """A CLI module reaches the stages through their public functions: it imports no
    model, kernel or data-reading internals directly."""
    internals = ("edgekit.models.", "edgekit.kernels.", "edgekit.data.dataset", "edgekit.export.to_onnx",
                 "edgekit.export.qdq", "edgekit.calibration.quantize", "edgekit.calibration.hq_search")
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("edgekit.cli")
                       for t in targets if t.startswith(internals))
    assert offenders == []

"""The package's import graph: no circles between files, and the library never reaches into the demo.

The graph is read from the sources with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
of every module under ``src/opensora_plan``, inside functions too, relative imports resolved, each name
mapped to the longest module it names. Imports of a package's ``__init__`` are not edges (the same rule as
the repository's stop hook, ``before-stop`` section 4), so a package that re-exports lazily is no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "opensora_plan"
# Besides the demo itself, the one module that may import the demo: the command line that offers `demo ...`.
CLI = f"{PACKAGE}.cli"


def _modules() -> dict[str, Path]:
    files = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the modules (not packages' ``__init__``) it imports, anywhere in its file."""
    files = _modules()
    edges = {module: set() for module in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `from pkg.mod import function` -> pkg.mod
                    name = name.rpartition(".")[0]
                if name and name != module and files[name].name != "__init__.py":
                    edges[module].add(name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state = {}  # module -> "open" while on the current path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def _is_demo(module: str) -> bool:
    return module == f"{PACKAGE}.demo" or module.startswith(f"{PACKAGE}.demo.")


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    edges = import_graph()
    assert f"{PACKAGE}.pipelines.model_folder" in edges[f"{PACKAGE}.pipelines.sample_t2v"]
    assert f"{PACKAGE}.data.datasets" in edges[f"{PACKAGE}.data.check"]  # `from .datasets import ...`
    assert f"{PACKAGE}.demo.train" in edges[f"{PACKAGE}.cli"]  # imported inside _run_demo_train
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circles_between_files():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle) + " (make the dependency one-way)"


def test_only_the_demo_and_the_cli_import_the_demo():
    offenders = sorted(f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
                       if _is_demo(target) and not (_is_demo(module) or module == CLI))
    assert not offenders, "library modules import the demo: " + "; ".join(offenders)

"""The package's import graph has no cycle: every module can be imported on its own (issue 16).

The imports are read from the source (the AST), not from ``sys.modules``: the ones inside functions count as
much as the ones at the top of a module (a lazy import hides a loop from the interpreter, not from a reader),
relative imports are resolved, and ``from posttrain.x import y`` where ``y`` is a submodule is an edge to
``posttrain.x.y``. Imports under ``if TYPE_CHECKING:`` never run and are left out; imports of third-party
packages (lazy ones of optional packages included) are not edges of this graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import posttrain

PACKAGE = Path(posttrain.__file__).parent


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def imports_of(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The modules of ``modules`` that module ``name`` (a package's ``__init__`` when ``is_package``)
    imports, wherever in its source."""
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name defined in the module (its __init__ for a package)
                found.add(target)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    names = set(files)
    return {name: imports_of(name, path.read_text(), names, path.name == "__init__.py") for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a path
    ``a -> b -> ... -> a``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                yield [*path[path.index(nxt) :], nxt]
                break
            path.append(nxt)
            seen.add(nxt)


def test_the_graph_is_read_whole() -> None:
    """Discovery is recursive and sees the imports inside functions (dispatch's loops, the vLLM backend)."""
    graph = import_graph()
    assert len(graph) > 80 and "posttrain.training.online" in graph and "posttrain.rollout.vllm" in graph
    assert "posttrain.rollout.vllm" in graph["posttrain.rollout.generate"]  # imported inside build_generator
    assert {"posttrain.training.online", "posttrain.training.iterative"} <= graph["posttrain.training.dispatch"]


def test_errors_is_a_leaf() -> None:
    assert import_graph()["posttrain.errors"] == set()


def test_data_and_model_do_not_import_each_other() -> None:
    """data/ lays batches out and model/ scores them; what both need sits outside them (posttrain.packing),
    and what needs both (the references) sits in training/."""
    graph = import_graph()
    for importer, imported in (("posttrain.model", "posttrain.data"), ("posttrain.data", "posttrain.model")):
        for name, targets in graph.items():
            if name == importer or name.startswith(importer + "."):
                wrong = sorted(t for t in targets if t == imported or t.startswith(imported + "."))
                assert wrong == [], f"{name} imports {wrong}"


def test_no_import_cycle() -> None:
    found = list(cycles(import_graph()))
    for cycle in found:
        print("import cycle: " + " -> ".join(cycle))
    assert found == []


def test_imports_of_reads_every_form() -> None:
    mods = {"p", "p.a", "p.b", "p.sub", "p.sub.c", "p.d"}
    source = """
from p import a
import torch
if TYPE_CHECKING:
    from p import d
def f():
    from .sub import c
    import p.b
    import vllm
"""
    assert imports_of("p.x", source, mods) == {"p.a", "p.b", "p.sub.c"}
    assert imports_of("p.sub.c", "from .. import a\nfrom ..b import thing", mods) == {"p.a", "p.b"}
    assert imports_of("p.sub", "from . import c\nfrom p import name", mods, is_package=True) == {"p.sub.c", "p"}


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert list(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]

"""The package's shape: imports flow one way (no cycles, even through imports inside functions), and
``bench`` is a leaf that only ``cli`` and ``bench`` itself import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tuneguard"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports anywhere it runs (``from x import y`` counts ``x.y`` when that is a module)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "metrics" not in p.relative_to(PACKAGE).parts[:2]
             or p.name == "__init__.py"}
    modules = set(files)
    return {name: imports_of(path, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exports its modules; importing the package is not importing them back."""
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    return {v: {w for w in ws if w not in packages} for v, ws in graph.items()}


def test_no_import_cycles() -> None:
    assert cycles(without_packages(import_graph())) == []


def test_bench_is_imported_only_by_cli_and_itself() -> None:
    offenders = {v: sorted(w for w in ws if w.startswith("tuneguard.bench"))
                 for v, ws in import_graph().items() if not v.startswith("tuneguard.bench") and v != "tuneguard.cli"}
    assert {v: ws for v, ws in offenders.items() if ws} == {}


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


LAYERS = [
    ("tuneguard.errors", "tuneguard.io", "tuneguard.progress", "tuneguard.provenance", "tuneguard.weights",
     "tuneguard.numerics", "tuneguard.args", "tuneguard.allocator", "tuneguard.hub"),
    ("tuneguard.recipe", "tuneguard.rundir", "tuneguard.adapters.capabilities"),
    ("tuneguard.backbones",),
    ("tuneguard.adapters",),
    ("tuneguard.data",),
    ("tuneguard.train",),
    ("tuneguard.eval",),
    ("tuneguard.report",),
    ("tuneguard.run", "tuneguard.cv", "tuneguard.select", "tuneguard.export", "tuneguard.lm_eval_model",
     "tuneguard.check"),
    ("tuneguard.cli", "tuneguard.bench"),
]
"""recipe → backbone → adapter → data → train → eval → report → run → cli/bench: the way data flows."""


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_imports_flow_one_way() -> None:
    """A module imports only its own layer or the ones before it: nothing upstream knows what comes after."""
    upstream = {v: sorted(w for w in ws if layer_of(w) > layer_of(v))
                for v, ws in without_packages(import_graph()).items() if v != "tuneguard"}
    assert {v: ws for v, ws in upstream.items() if ws} == {}

"""The package's import graph has no cycle, read from the source (nothing is imported).

Every `import` and `from ... import` of a module counts, wherever it stands: at the top level, inside a
function, under `if TYPE_CHECKING:`. A function-level import hides a cycle from the interpreter but not
from the reader: the two modules still cannot be understood, tested or moved apart, and the cycle
bites as soon as someone lifts the import to the top. So the graph here is the source's, not the one
Python happens to execute.

Edges: `import a.b.c` and `from a.b import c` point at `a.b.c` when that is a module (or package)
of ours, else at the longest prefix that is (`from a.b import name` -> `a.b`); relative imports are
resolved against the importing module's package; a package is its `__init__.py`. Only the imported
module is an edge, not the parent packages Python also runs on the way (an `__init__` that imports its
own submodules would otherwise close a cycle with each of them). Modules named by a string
(`importlib.import_module`, bench's registry) are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "genpt_dist"

Edge = tuple[str, str, str]  # (importer, imported, "file:line" of the import)


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: source file} of every .py under `root` (the folder of `package`)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """`name`, or its longest dotted prefix, that is one of ours; None for a module of someone else."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _imported(module: str, path: Path, tree: ast.AST, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module of ours, line) for every import statement anywhere in `tree`."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            for alias in node.names:
                target = _resolve(origin if alias.name == "*" else f"{origin}.{alias.name}", known)
                if target is not None:
                    yield target, node.lineno


def import_graph(root: Path, package: str) -> list[Edge]:
    """Every import edge between modules of `package` (source under `root`), self-imports left out."""
    known = module_names(root, package)
    edges: list[Edge] = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(root.parent)
        for target, line in _imported(module, path, tree, known):
            if target != module:
                edges.append((module, target, f"{where}:{line}"))
    return edges


def cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle through it (its
    edges, in order): a component may hold several cycles, and breaking the one shown may leave others."""
    graph: dict[str, dict[str, str]] = {}
    for a, b, where in edges:
        graph.setdefault(a, {}).setdefault(b, where)
        graph.setdefault(b, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(component, _a_cycle(graph, component)) for component in sorted(components)]


def _a_cycle(graph: dict[str, dict[str, str]], component: list[str]) -> list[Edge]:
    """The shortest cycle through the component's first module, inside the component (breadth first)."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    nodes = [*reversed(chain), start]
                    return [(a, b, graph[a][b]) for a, b in zip(nodes, nodes[1:])]
                if w in inside and w not in parent and w != start:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component {component}")


def describe(component: list[str], cycle: list[Edge]) -> str:
    path = " -> ".join([cycle[0][0], *(f"{b} ({where})" for _, b, where in cycle)])
    return f"{len(component)} modules import each other: {', '.join(component)}\n  e.g. {path}"


def test_the_package_has_no_import_cycle() -> None:
    edges = import_graph(REPO / PACKAGE, PACKAGE)
    assert len({a for a, _, _ in edges}) > 50, "the graph lost its modules: is the package still there?"
    found = cycles(edges)
    assert not found, "import cycles (module -> imported module (where it is imported)):\n" + "\n".join(
        describe(*c) for c in found
    )


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A cycle closed by a function-level, a TYPE_CHECKING or a relative import is found; a name imported
    from a package points at the package, a submodule at the submodule."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import C\n",
        "sub/__init__.py": "NAME = 1\n",
        "sub/c.py": "from .. import a\nfrom . import NAME\nimport os.path\n",
        "d.py": "from pkg.sub import NAME\nimport pkg.sub.c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    edges = {(a, b) for a, b, _ in import_graph(pkg, "pkg")}
    assert edges == {
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.sub.c"),
        ("pkg.sub.c", "pkg.a"),
        ("pkg.sub.c", "pkg.sub"),
        ("pkg.d", "pkg.sub"),
        ("pkg.d", "pkg.sub.c"),
    }
    ((component, cycle),) = cycles(import_graph(pkg, "pkg"))
    assert component == ["pkg.a", "pkg.b", "pkg.sub.c"]
    assert [(a, b) for a, b, _ in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.a")]
    assert describe(component, cycle).endswith(
        "e.g. pkg.a -> pkg.b (pkg/a.py:2) -> pkg.sub.c (pkg/b.py:3) -> pkg.a (pkg/sub/c.py:1)"
    )

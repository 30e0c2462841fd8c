# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""No import circles inside ``monai_umed``: every arrow between two of its modules points one way.

The graph is read from the source with :mod:`ast` (nothing is imported, so the test takes well under a second).
Its nodes are the modules of ``monai_umed/``, a package's ``__init__.py`` being the node of the package itself
(``import monai_umed.protectors`` points to ``monai_umed/protectors/__init__.py``). Its edges are the imports of
``monai_umed`` modules written anywhere in a file: at module level *and* inside functions (a lazy import hides a
circle from the interpreter, not from the design), absolute and relative. ``from monai_umed.x import y`` points to
the submodule ``monai_umed.x.y`` when there is one, and to ``monai_umed.x`` otherwise.

How packages are treated:

- Importing ``monai_umed.x.y`` also runs ``monai_umed/x/__init__.py`` first, but that implicit step is *not* an edge.
  It would turn every package that re-exports its submodules (``pkg/__init__`` -> ``pkg/sub``) into a circle as
  soon as one submodule imports a sibling (``pkg/sub`` -> ``pkg/other`` -> implicitly ``pkg`` -> ``pkg/sub``),
  and that is harmless: Python registers the package before running its ``__init__``, so a submodule can always
  import its siblings while the package is being initialised.
- An explicit import of the package (``from monai_umed.protectors import get`` in ``protectors/sub.py``) *is* an
  edge, to ``protectors/__init__``. With the usual re-export ``pkg/__init__`` -> ``pkg/sub`` this is a real circle:
  at module level it fails with "partially initialised module", and inside a function it makes a low-level
  submodule depend on the facade that is built from it. A submodule should import the sibling that defines the
  name (``from monai_umed.protectors.base import ...``). Where the ``__init__`` does not import that submodule,
  the edge makes no circle and is fine.
- Modules loaded by a name held in a string (the protector registry's ``importlib.import_module`` of the
  ``_BUILTIN`` table) are not followed: that is deliberate late binding of plugins, not an import written
  against a module, and a table of strings cannot be read reliably.
- Imports under ``if TYPE_CHECKING:`` never run, and are left out: a type annotation may name a higher module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "monai_umed"
# the sources beside these tests, read as text: nothing of the package is imported
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """The modules of the package, by dotted name (a package's ``__init__.py`` under the package's own name).

    Args:
        root: the folder of the top-level package.

    Returns:
        ``{"monai_umed.x.y": path}`` for every ``.py`` file under ``root``.
    """
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` test is ``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth, except those in the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            # the ``else`` branch does run
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that ``name`` lives in: ``name`` itself, or its longest dotted prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``monai_umed`` modules that one module imports, anywhere in its source.

    Args:
        module: the dotted name of the module.
        path: its source file.
        modules: all modules of the package (see :func:`module_files`).

    Returns:
        Dotted names of the imported modules, without ``module`` itself.
    """
    is_package = path.name == "__init__.py"
    targets: set[str | None] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(_owner(alias.name, modules) for alias in node.names if alias.name.split(".")[0] == PACKAGE)
            continue
        if node.level:
            # relative: ``.`` is the package the module belongs to (a package's ``__init__`` belongs to itself)
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` runs ``pkg/__init__``
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in modules else _owner(base, modules))
    return {t for t in targets if t is not None and t != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """The import graph of the package: each module and the package modules it imports."""
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


@functools.lru_cache(maxsize=1)
def package_graph() -> dict[str, set[str]]:
    """The import graph of ``monai_umed`` (read once for all the tests of this file)."""
    return import_graph(ROOT)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest cycle ``[start, ..., start]`` within ``members`` (breadth-first; one exists in a component)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while start not in parent:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & members):
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    path = [start, parent[start]]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """The import circles of ``graph``: one per group of modules that import each other, directly or not.

    Such a group (a strongly connected component of more than one module, or a module importing itself) may hold
    several circles; the shortest one through its first module is shown, as the smallest thing to read, beside
    the whole group, since breaking that circle may leave another one.

    Args:
        graph: module -> modules it imports.

    Returns:
        ``(cycle, group)`` pairs, a cycle as ``[a, b, ..., a]`` and the group sorted, sorted by group.
    """
    found = []
    for component in _components(graph):
        start = component[0]
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        found.append((_shortest_cycle(graph, set(component), start), component))
    return sorted(found, key=lambda c: c[1])


def _describe(cycle: list[str], group: list[str]) -> str:
    text = " -> ".join(cycle)
    if len(group) > len(cycle) - 1:
        text += f"  (modules in this tangle: {', '.join(group)})"
    return text


def test_graph_is_read() -> None:
    """The graph of the real package has its modules and edges (guards against a parser that finds nothing)."""
    graph = package_graph()
    assert {PACKAGE, f"{PACKAGE}.protectors", f"{PACKAGE}.data.formats"} <= set(graph)
    # module level, and a lazy import inside a function
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.bundle"]
    assert f"{PACKAGE}.pipeline" in graph[f"{PACKAGE}.bundle"]
    # ``from monai_umed import protectors`` points to the package's ``__init__``
    assert f"{PACKAGE}.protectors" in graph[f"{PACKAGE}.bundle"]


def test_imports_of_a_package(tmp_path: Path) -> None:
    """Relative, lazy, ``TYPE_CHECKING`` and ``from pkg import submodule`` imports resolve to the right nodes."""
    files = {
        "__init__.py": "from . import a\nfrom .sub import thing\n",
        "a.py": "def f():\n    from .b import x\n    import monai_umed.sub.c\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from monai_umed import a\nimport os\n",
        "sub/__init__.py": "thing = 1\n",
        "sub/c.py": "from .. import a, b\nfrom ..sub import thing\nfrom monai_umed.sub import c, d\nimport numpy\n",
        "sub/d.py": "from monai_umed.b import missing_name\nfrom monai_umed.nothing import y\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        "monai_umed": {"monai_umed.a", "monai_umed.sub"},
        "monai_umed.a": {"monai_umed.b", "monai_umed.sub.c"},
        "monai_umed.b": set(),
        "monai_umed.sub": set(),
        "monai_umed.sub.c": {"monai_umed.a", "monai_umed.b", "monai_umed.sub", "monai_umed.sub.d"},
        "monai_umed.sub.d": {"monai_umed", "monai_umed.b"},
    }
    # ``sub/d`` -> ``monai_umed`` (an unknown ``monai_umed.nothing`` falls back to the top package) closes a circle
    assert [c for c, _ in find_cycles(graph)] == [["monai_umed", "monai_umed.a", "monai_umed.sub.c", "monai_umed.sub.d",
                                                   "monai_umed"]]


def test_find_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"]), (["e", "e"], ["e"])]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    # two circles through ``a``: the shortest one is shown, and the group names every module in either
    cycles = find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}})
    assert cycles == [(["a", "b", "a"], ["a", "b", "c", "d"])]
    assert "modules in this tangle: a, b, c, d" in _describe(*cycles[0])


def test_no_import_cycles() -> None:
    cycles = [_describe(cycle, group) for cycle, group in find_cycles(package_graph())]
    for line in cycles:
        print("import cycle: " + line)
    assert not cycles, "import cycles in monai_umed:\n" + "\n".join(cycles)

"""The house's structure: no import circle among the modules of ``flowrl/`` and ``envs/``, and
``envs/`` importing nothing of flowrl above it.

The import graph is read from the source with ``ast`` (nothing is imported): every ``import``
and ``from ... import`` statement of a module, at module level and inside functions and
classes, relative ones resolved against the module's package. Imports under
``if TYPE_CHECKING:`` are left out: they never run, so they cannot close a circle at run time,
and annotations may name types of any layer. ``from pkg import name`` points at the submodule
``pkg.name`` when there is one, else at ``pkg`` (its ``__init__``). An import points at the
module it names, not at the packages above it (Python runs their ``__init__`` first, but a
package importing its own submodules is not a circle).

The layers, top to bottom (the house style; an import only ever points down):
cli -> bench -> experiment -> algos -> rollout -> models -> config -> rewards -> envs ->
runtime -> core / runlog / errors. ``envs/`` may import only ``flowrl.runtime``,
``flowrl.core``, ``flowrl.runlog``, ``flowrl.errors`` and other ``envs`` modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowrl", "envs")
# What envs/ may import of flowrl: the layers below it (a module or a package and its submodules).
ENVS_MAY_IMPORT = ("flowrl.runtime", "flowrl.core", "flowrl.runlog", "flowrl.errors")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file for every ``.py`` under ``root/<package>``
    (``pkg/__init__.py`` is module ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (any ``x.TYPE_CHECKING``)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth, except the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch runs
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import starts from (its dots resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (source ``path``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = _resolve(module, is_package, node)
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.update(name for name in names if name in known)
    found.discard(module)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules (of ``packages`` under ``root``) it imports."""
    files = module_files(root, packages)
    known = set(files)
    return {module: imported_modules(module, path, known) for module, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected component of more than one module (Tarjan's
    algorithm, iterative), each sorted; the list sorted too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def upward_from_envs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for every import of an ``envs`` module into flowrl above the envs layer."""
    return sorted(
        (module, target)
        for module, targets in graph.items()
        if _within(module, ("envs",))
        for target in targets
        if target.startswith("flowrl") and not _within(target, ENVS_MAY_IMPORT)
    )


def shortest_cycle(graph: dict[str, set[str]], circle: list[str]) -> list[str]:
    """One import path round ``circle`` (a strongly connected component): the shortest from its
    first module back to it, e.g. ``[a, b, a]`` for a imports b imports a (breadth-first search)."""
    start, members = circle[0], set(circle)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise ValueError(f"{circle} is not a circle of the graph")


def test_flowrl_and_envs_have_no_import_circle() -> None:
    graph = import_graph(ROOT)
    found = circles(graph)
    assert not found, (
        "import circles (move what the modules share to a lower layer: this file's docstring):\n"
        + "\n".join(f"{', '.join(c)}: e.g. {' -> '.join(shortest_cycle(graph, c))}" for c in found)
    )


def test_envs_import_nothing_of_flowrl_above_them() -> None:
    found = upward_from_envs(import_graph(ROOT))
    assert not found, (
        f"envs/ may import only {', '.join(ENVS_MAY_IMPORT)} of flowrl (the layers: this file's docstring); upward "
        "imports:\n" + "\n".join(f"{a} imports {b}" for a, b in found)
    )


# The checker itself, on hand-made packages whose graphs are known.


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {
    "pkg/__init__.py": "from pkg.a import A\n",
    "pkg/a.py": "from pkg.b import B\nimport pkg.c\nA = 1\n",
    "pkg/b.py": "from . import c\nB = 2\n",
    "pkg/c.py": "import os\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/d.py": "from ..b import B\nfrom typing import TYPE_CHECKING\n"
    "if TYPE_CHECKING:\n    from pkg.sub.e import E\n",
    "pkg/sub/e.py": "from pkg.sub import d\nE = 3\n",
}


def test_the_checker_reads_every_kind_of_import_of_a_hand_made_package(tmp_path: Path) -> None:
    _write(tmp_path, CLEAN)
    assert import_graph(tmp_path, ("pkg",)) == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.c"},
        "pkg.b": {"pkg.c"},  # `from . import c`: the submodule
        "pkg.c": set(),
        "pkg.sub": set(),
        "pkg.sub.d": {"pkg.b"},  # two dots: pkg; the TYPE_CHECKING import is left out
        "pkg.sub.e": {"pkg.sub.d"},
    }
    assert circles(import_graph(tmp_path, ("pkg",))) == []


@pytest.mark.parametrize(
    ("extra", "circle"),
    [
        ({"pkg/c.py": "from pkg.a import A\n"}, ["pkg.a", "pkg.b", "pkg.c"]),  # module level, through b
        ({"pkg/c.py": "def f():\n    from .a import A\n    return A\n"}, ["pkg.a", "pkg.b", "pkg.c"]),  # in a function
        ({"pkg/b.py": "import pkg.sub\nfrom . import c\n"}, None),  # pkg.sub imports nothing back: still clean
        ({"pkg/b.py": "from pkg.sub.d import x\n", "pkg/sub/d.py": "from ..b import B\n"}, ["pkg.b", "pkg.sub.d"]),
        (
            {"pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    import pkg.a\n"},
            ["pkg.a", "pkg.b", "pkg.c"],  # the else branch of TYPE_CHECKING runs
        ),
    ],
)
def test_the_checker_finds_a_circle_of_a_hand_made_package(tmp_path: Path, extra: dict, circle: list | None) -> None:
    _write(tmp_path, {**CLEAN, **extra})
    graph = import_graph(tmp_path, ("pkg",))
    assert circles(graph) == ([circle] if circle else [])
    if circle:  # the path the message shows: the circle's first module back to itself
        path = shortest_cycle(graph, circle)
        assert path[0] == path[-1] == circle[0] and set(path) <= set(circle)
        assert all(b in graph[a] for a, b in zip(path, path[1:], strict=False))


def test_the_checker_reports_two_separate_circles_and_upward_imports_from_envs(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "flowrl/__init__.py": "",
            "flowrl/errors.py": "",
            "flowrl/core/__init__.py": "from flowrl.core.x import X\n",
            "flowrl/core/x.py": "from flowrl.errors import E\nX = 1\n",
            "flowrl/rollout/__init__.py": "",
            "flowrl/rollout/p.py": "from flowrl.rollout.q import Q\n",
            "flowrl/rollout/q.py": "def f():\n    from flowrl.rollout import p\n",
            "flowrl/config.py": "import flowrl.rewards\n",
            "flowrl/rewards.py": "from flowrl import config\n",
            "envs/__init__.py": "from flowrl.errors import E\nfrom flowrl.core import X\n",
            "envs/up.py": "from flowrl.rollout.p import P\nimport flowrl.config\nfrom envs import toy\n",
            "envs/toy.py": "import flowrl.core.x\n",
        },
    )
    graph = import_graph(tmp_path)
    assert circles(graph) == [["flowrl.config", "flowrl.rewards"], ["flowrl.rollout.p", "flowrl.rollout.q"]]
    assert shortest_cycle(graph, ["flowrl.config", "flowrl.rewards"]) == [
        "flowrl.config",
        "flowrl.rewards",
        "flowrl.config",
    ]
    assert upward_from_envs(graph) == [("envs.up", "flowrl.config"), ("envs.up", "flowrl.rollout.p")]

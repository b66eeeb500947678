"""The module import graph of nestsynth is acyclic, and every subpackage imports on its own.

The graph is read from the source with :mod:`ast`: every ``import`` / ``from ... import``
of a nestsynth module, at module level *and* inside functions (a deferred import that
only dodges a cycle is still a cycle), relative imports resolved, and
``from PKG import name`` pointing at the submodule ``PKG.name`` when there is one.
An import points at the module it names; the parent packages that Python also runs
(their ``__init__``) are not edges, as in import-linter and pydeps.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "nestsynth"
SRC = Path(__file__).resolve().parents[1] / "src"


def find_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module under ``src/package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _known(name: str, modules) -> str | None:
    """``name``, or its longest prefix that is a module (``pkg.mod.attr`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def module_imports(name: str, path: Path, is_pkg: bool, modules) -> dict[str, int]:
    """The package modules that module ``name`` imports anywhere in its body -> first line."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package of a relative import
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        for target in targets:
            known = _known(target, modules) if target.split(".")[0] == PACKAGE else None
            if known is not None:
                out.setdefault(known, node.lineno)
    return out


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {imported module: line} for every module of the package."""
    modules = find_modules(src, package)
    return {name: module_imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def find_cycle(graph) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def describe(cycle: list[str], graph) -> str:
    """``a (line 12) -> b (line 3) -> a``: each step with the line of its import."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


# ---- the reader itself -------------------------------------------------------------------
def test_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert len(graph) > 50
    assert "nestsynth.config" in graph["nestsynth.baselines.registry"]  # from ..config import ...
    assert "nestsynth.checkpoint" in graph["nestsynth.report.summary"]  # from .. import checkpoint as ckpt
    assert "nestsynth.baselines._modules" in graph["nestsynth.baselines"]  # from . import _modules
    assert "nestsynth.baselines.magnitude" in graph["nestsynth.baselines._modules"]
    assert "nestsynth.sparse.mlp" in graph["nestsynth.export.compact"]  # from ..sparse.mlp import ...
    assert "nestsynth.data" in graph["nestsynth.api"]  # a package, not its submodules
    assert "nestsynth.baselines" in graph["nestsynth.cli"]  # only inside a function
    assert PACKAGE not in graph["nestsynth.cli"]  # the parent package run first is not an edge


def test_find_cycle_returns_the_path(tmp_path):
    pkg = tmp_path / "nestsynth"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(tmp_path)
    assert graph["nestsynth.sub"] == {"nestsynth.sub.b": 1}
    assert find_cycle(graph) == ["nestsynth.a", "nestsynth.sub.b", "nestsynth.a"]
    assert describe(find_cycle(graph), graph) == "nestsynth.a (line 1) -> nestsynth.sub.b (line 2) -> nestsynth.a"
    (pkg / "sub" / "b.py").write_text("def f():\n    import nestsynth\n")  # the (empty) top package
    assert find_cycle(import_graph(tmp_path)) is None
    (pkg / "sub" / "b.py").write_text("import nestsynth.sub\n")  # a submodule importing its own package
    assert find_cycle(import_graph(tmp_path)) == ["nestsynth.sub.b", "nestsynth.sub", "nestsynth.sub.b"]


# ---- the package ---------------------------------------------------------------------------
def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe(cycle, graph)}"


SUBPACKAGES = sorted(name for name, (_, is_pkg) in find_modules().items() if is_pkg and name != PACKAGE)

# Each subpackage in turn, after every nestsynth module is dropped from sys.modules, so that
# nestsynth's own code runs from scratch for each one (torch and the other libraries stay
# loaded: one interpreter instead of one per subpackage); its __all__ must resolve.
_IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "nestsynth" or m.startswith("nestsynth.")]:
        del sys.modules[loaded]
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing} it does not define"
    print("ok", name)
"""


def test_subpackages_import_on_their_own():
    assert {"nestsynth.baselines", "nestsynth.export", "nestsynth.report"} <= set(SUBPACKAGES)
    names = SUBPACKAGES + [PACKAGE, "nestsynth.config", "nestsynth.cli"]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [w for n in names for w in ("ok", n)]

"""The layers of the project (docs/architecture.md), checked on the source and at import time.

applications -> oracles -> zoopt: the library never imports the paper's black boxes or its
experiments, and ``import zoopt`` (and every framework-agnostic module of it) loads no torch,
Dask, CuPy or PhiFlow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "distributed", "dask", "cupy", "phi", "phiml")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements(path: Path, module: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Every import in ``path`` (module ``module``, default: from its place in the
    repository), anywhere in the file: also inside functions, under ``TYPE_CHECKING``, and
    ``importlib.import_module("...")`` with a literal name. Each is ``(absolute module
    name, names imported from it)``; ``import a.b`` and ``import_module`` give no names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, tuple(alias.name for alias in node.names)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, ()))
    return found


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` (module ``module``, default: from its place in
    the repository) imports, anywhere in the file: also inside functions, and
    ``importlib.import_module("...")`` with a literal name."""
    found: set[str] = set()
    for name, names in _import_statements(path, module):
        found.add(name)
        found.update(f"{name}.{n}" for n in names)
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in _sources(package):
        hits = sorted(name for name in imports_of(path) if name.split(".")[0] in forbidden and name)
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_import_scanner_sees_relative_lazy_and_dynamic_imports(tmp_path):
    # the checks below are only as good as this scanner: make sure it can fail
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "from . import oracle\n"
        "def f():\n"
        "    from oracles import classifier\n"
        "    importlib.import_module('applications.zo_sol')\n"
    )
    names = imports_of(probe, module="zoopt.probe")
    assert {"zoopt.oracle", "oracles", "oracles.classifier", "applications.zo_sol"} <= names


def test_the_library_never_imports_oracles_or_applications():
    assert _sources("zoopt"), "no library sources found"
    assert _offenders("zoopt", ("oracles", "applications")) == {}


def test_oracles_never_import_applications():
    assert _offenders("oracles", ("applications",)) == {}


def test_framework_agnostic_core_has_no_module_level_torch():
    """Modules outside zoopt/torch may import torch inside a function (an optional feature),
    never at module level."""
    bad = {}
    for path in _sources("zoopt"):
        if "torch" in path.relative_to(ROOT / "zoopt").parts:
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = set()
        for node in top:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif node.level == 0 and node.module:
                names.add(node.module)
            elif node.level and node.module:
                names.add(node.module)  # relative: `from .torch import x` would show here
        heavy = sorted(n for n in names if n.split(".")[0] in ("torch", "cupy", "phi"))
        if heavy:
            bad[str(path.relative_to(ROOT))] = heavy
    assert bad == {}


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    return sorted(set(loaded) & set(HEAVY))


def test_import_zoopt_is_light():
    assert _loaded_after("import zoopt") == []


@pytest.mark.parametrize(
    "module",
    [
        _module_name(p)
        for p in _sources("zoopt")
        if "torch" not in p.relative_to(ROOT / "zoopt").parts
        and "parallel" not in p.relative_to(ROOT / "zoopt").parts
    ],
)
def test_every_core_module_imports_without_heavy_dependencies(module):
    assert _loaded_after(f"import {module}") == []


def test_the_parallel_package_loads_no_torch():
    pytest.importorskip("distributed")
    assert "torch" not in _loaded_after("import zoopt.parallel")


# -- no import cycle ----------------------------------------------------------------------
PACKAGES = ("zoopt", "oracles", "applications")


def _modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name (a package: its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` it imports (every import the scanner sees).

    ``import a.b.c`` and ``import_module("a.b.c")`` import the longest of ``a.b.c``, ``a.b``,
    ``a`` that is a module; ``from p import n`` imports module ``p.n`` if there is one, else
    ``p`` (a name defined in ``p``). A package's ``__init__`` running because one of its
    submodules is imported is not an edge: it is not a dependency of the importer.
    """

    def longest(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str | None] = set()
        for name, names in _import_statements(path, module):
            if not names:
                targets.add(longest(name))
            for n in names:
                targets.add(f"{name}.{n}" if f"{name}.{n}" in modules else longest(name))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for group in groups:  # a shortest path from the group's first module back to itself
        start = min(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in came_from:
                        came_from[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def write_tree(root, files):
    """Write ``{"pkg/a.py": source}`` under ``root`` (folders made as needed): a probe package."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_check_finds_a_cycle_through_lazy_and_type_only_imports(tmp_path):
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": "from . import b\ndef f():\n    return b.g()\n",
            "pkg/b.py": "def g():\n    from .c import h\n    return h()\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg.a import f\n",
            "pkg/d.py": "import pkg.a\nfrom pkg import f\n",  # importers: no cycle
        },
    )
    graph = import_graph(_modules(tmp_path, ("pkg",)))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.d"] == {"pkg", "pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_the_import_graph_has_no_cycle():
    """No module imports (at any depth, also only for type checking) a module that imports
    it back, directly or through others: every dependency points one way."""
    modules = _modules()
    assert {"zoopt.torch.engine.core", "oracles", "applications.sol.model"} <= set(modules)
    cycles = import_cycles(import_graph(modules))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# -- no module uses another module's private names -----------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(modules: dict[str, Path]) -> list[str]:
    """``module:line: code`` for every use of another module's private name:

    * ``from m import _name`` (or ``from m import _sub``: a private submodule) where ``m``
      is another module of ``modules``; a private submodule may be imported from within
      the package that holds it;
    * ``obj._name`` where ``obj`` is not ``self``, ``cls`` or ``super()`` and ``_name`` is
      a private name the project defines (a function, class, method, attribute or module
      variable) but the using module does not (``ch.engine._module(...)``, ``mod._helper``).
      Private members of third-party objects (``torch._C``, ``tensor._version``) are not
      the project's to police.
    """
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in modules.items()}
    defined: dict[str, set[str]] = {}
    for module, tree in trees.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
        defined[module] = {n for n in names if _private(n)}
    project_private = set().union(*defined.values())

    tops = {m.split(".")[0] for m in modules}
    found = []
    for module, tree in trees.items():
        here = f"{module}:"
        for name, names in _import_statements(modules[module], module):
            for n in names:
                if not _private(n) or name == module or name.split(".")[0] not in tops:
                    continue
                owner = name if f"{name}.{n}" not in modules else f"{name}.{n}"
                if owner == f"{name}.{n}" and (module + ".").startswith(name + "."):
                    continue  # a private submodule, imported within its package
                found.append(f"{here} from {name} import {n}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            obj = node.value
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
                continue
            if isinstance(obj, ast.Call) and getattr(obj.func, "id", None) == "super":
                continue
            if node.attr in project_private and node.attr not in defined[module]:
                found.append(f"{here}{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_the_private_access_check_sees_imports_and_attributes(tmp_path):
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_impl.py": "def helper():\n    pass\n",
            "pkg/core.py": "from . import _impl\n"  # a private submodule within its package
            "def _helper():\n    pass\n"
            "class Engine:\n"
            "    def __init__(self):\n        self._cache = {}\n"
            "    def _module(self, node):\n        return self._cache[node]\n",
            "pkg/rules.py": "import torch\n"
            "from .core import _helper\n"
            "def rule(ch, t):\n"
            "    t._version, torch._C\n"  # third-party privates: not flagged
            "    return ch.engine._module(1)\n",
        },
    )
    assert private_uses(_modules(tmp_path, ("pkg",))) == [
        "pkg.rules: from pkg.core import _helper",
        "pkg.rules:5: ch.engine._module",
    ]


def test_no_module_uses_another_modules_private_names():
    """Two modules sharing a helper make it public (and documented) where it belongs; one
    module reaching into another's ``_members`` (``ch.engine._graph``) is an interface the
    owner does not know it has. (No allow-list: the tree has no such use; keep it so.)"""
    assert private_uses(_modules()) == []


def private_reaches(modules: dict[str, Path], package: str) -> list[str]:
    """``module:line: code`` for every ``obj._name`` in ``package`` where ``obj`` is not
    ``self``, ``cls`` or ``super()`` and ``_name`` is a private name the project defines,
    even one the using module defines too (``ch.engine._plan`` in a module with a ``_plan``
    of its own, ``self.cache._scratch``): an object reaching into another's members."""
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in modules.items()}
    project_private = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            else:
                continue
            if _private(name):
                project_private.add(name)
    found = []
    for module, tree in trees.items():
        if not (module == package or module.startswith(package + ".")):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in project_private):
                continue
            obj = node.value
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
                continue
            if isinstance(obj, ast.Call) and getattr(obj.func, "id", None) == "super":
                continue
            found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_the_reach_check_sees_a_private_member_the_user_also_defines(tmp_path):
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core.py": "class Engine:\n    def __init__(self):\n        self._plan = None\n",
            "pkg/rules.py": "class Rules:\n"
            "    def __init__(self):\n        self._plan = 1\n"  # its own _plan: fine
            "    def rule(self, ch, t):\n"
            "        t._version\n"  # a third-party private: not flagged
            "        return self._plan, ch.engine._plan\n",
        },
    )
    assert private_reaches(_modules(tmp_path, ("pkg",)), "pkg") == ["pkg.rules:6: ch.engine._plan"]


def test_the_engines_parts_reach_into_no_other_objects_private_members():
    """The engine's core, planner, caches, rules and chunks talk through public interfaces
    (``ch.context.unperturbed(node)``, never ``ch.engine._cache``)."""
    modules = _modules()
    assert "zoopt.torch.engine.context" in modules
    assert private_reaches(modules, "zoopt.torch.engine") == []


# -- data that is downloaded or unpickled stays out of the core ----------------------------
#: Who may import zoopt.datasets (the package fetcher, the one restricted unpickler, the data
#: sets read through them): the package itself and the torch layer, where ``zoopt train``
#: loads its data set (zoopt/torch/cli_tasks.py). The applications may too.
DATASETS_IMPORTERS = ("zoopt.datasets", "zoopt.torch")


def core_datasets_imports(modules: dict[str, Path]) -> list[str]:
    """``module: name`` for every module of ``zoopt`` outside :data:`DATASETS_IMPORTERS`
    that imports ``zoopt.datasets`` (or a module of it)."""

    def within(module: str, packages: tuple[str, ...]) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    found = []
    for module, path in modules.items():
        if not within(module, ("zoopt",)) or within(module, DATASETS_IMPORTERS):
            continue
        found += [
            f"{module}: {n}" for n in imports_of(path, module) if within(n, ("zoopt.datasets",))
        ]
    return sorted(found)


def test_the_datasets_check_sees_a_core_module_importing_it(tmp_path):
    write_tree(
        tmp_path,
        {
            "zoopt/__init__.py": "",
            "zoopt/torch/__init__.py": "",
            "zoopt/datasets/__init__.py": "",
            "zoopt/datasets/images.py": "from .pickles import load_numpy_pickle\n",
            "zoopt/torch/cli_tasks.py": "from .. import datasets\n",
            "zoopt/minimize.py": "def f():\n    from .datasets import load_cifar10\n",
        },
    )
    assert core_datasets_imports(_modules(tmp_path, ("zoopt",))) == [
        "zoopt.minimize: zoopt.datasets",
        "zoopt.minimize: zoopt.datasets.load_cifar10",
    ]


def test_the_core_never_imports_the_datasets_package():
    """An optimizer has no business fetching archives or unpickling files: ``zoopt.data``
    (local, pickle-free loaders and batching) is all the core reads data with."""
    modules = _modules()
    assert "zoopt.datasets" in modules
    assert core_datasets_imports(modules) == []

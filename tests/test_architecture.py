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


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` (module ``module``, default: from its place in
    the repository) imports, anywhere in the file: also inside functions, and
    ``importlib.import_module("...")`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
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

"""The package layout's rules (docs/design.md §5), checked on the source and in fresh interpreters:

- `scalecert.runtime` (with its pipelines), `scalecert.core` and `scalecert.bundle` import without
  torch, and the runtime certifies an image without it (what runs on a Jetson);
- `scalecert.export` never imports `scalecert.compile` (data flows export -> bundle -> compile);
- layers point one way: no module imports a package above its own (LAYERS), and no scalecert
  modules import each other in a cycle (imports inside functions count for both);
- no module reaches into another scalecert package's private names;
- the CLI offers exactly the backends and precisions the code knows.

Each AST rule is also run on a small snippet that breaks it, so a checker that sees nothing fails.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import click
import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "scalecert")
TORCH_FREE = ("runtime", "core", "bundle")


def _modules_under(*packages: str) -> list[str]:
    """Dotted names of every module (files and packages) under scalecert/<package>/."""
    names = []
    for package in packages:
        for directory, _, files in os.walk(os.path.join(PACKAGE, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].split(os.sep)
                names.append(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    return sorted(names)


def _source_files(*roots: str) -> list[str]:
    return sorted(os.path.join(directory, name) for root in roots for directory, _, files in os.walk(root)
                  for name in files if name.endswith(".py"))


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """(absolute module, imported name or None, line) for every import anywhere in the source
    (function bodies included), relative imports resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.args[0].value, None, node.lineno))
    return found


def _imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module the source imports: `from a.b import c` counts a.b and a.b.c (c may be a module)."""
    out = set()
    for base, name, _ in _imports(source, module, is_package):
        out.add(base)
        if name is not None:
            out.add(f"{base}.{name}")
    return out


def _top(module: str) -> str:
    """The top package of a scalecert module ("scalecert.export.split" -> "export"); other code is its own."""
    parts = module.split(".")
    return parts[1] if parts[0] == "scalecert" and len(parts) > 1 else parts[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """`from scalecert.X... import _name` (or a private module on the path) where X is not the
    importing module's own top package."""
    bad = []
    for base, name, line in _imports(source, module, is_package):
        parts = base.split(".")
        if parts[0] != "scalecert":
            continue
        if base == "scalecert":  # from scalecert import <top package or module>
            target, private = name or "", _is_private(name or "")
        else:
            target = parts[1]
            private = any(_is_private(p) for p in parts[1:]) or (name is not None and _is_private(name))
        if private and target != _top(module):
            bad.append(f"{module}:{line}: from {base} import {name}")
    return bad


# --- (a) torch-free imports --------------------------------------------------------------------------


def test_torch_free_packages_import_without_torch():
    modules = _modules_under(*TORCH_FREE)
    assert "scalecert.runtime.pipelines.tensorrt" in modules and "scalecert.core.geometry" in modules
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], f"importing {', '.join(TORCH_FREE)} imported torch"


def test_runtime_certifies_without_torch(tiny_bundle, photo_files):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from scalecert.runtime import Certifier\n"
        f"with Certifier.load({tiny_bundle!r}) as cert:\n"
        f"    r = cert.certify({photo_files[0]!r})\n"
        "assert r.status in ('certified', 'alert'), r.status\n"
        "assert not [m for m in sys.modules if m.startswith('torch.')]\n"
        "print(r.status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("certified", "alert")


def test_the_torch_check_sees_torch():
    """Negative control: the same subprocess check reports a module that imports torch."""
    pytest.importorskip("torch")
    code = ("import json, sys\n"
            "import scalecert.export.networks\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in json.loads(proc.stdout)


# --- (b) export never imports compile ------------------------------------------------------------------


def _compile_imports(path: str) -> list[str]:
    module = _module_name(path)
    with open(path) as f:
        imported = _imported_modules(f.read(), module, path.endswith("__init__.py"))
    return sorted(m for m in imported if m == "scalecert.compile" or m.startswith("scalecert.compile."))


def test_export_never_imports_compile():
    files = _source_files(os.path.join(PACKAGE, "export"))
    assert len(files) >= 10
    offenders = {os.path.relpath(p, ROOT): found for p in files if (found := _compile_imports(p))}
    assert not offenders, offenders


@pytest.mark.parametrize("source", [
    "from scalecert.compile.precision import to_fp16\n",
    "def f():\n    from scalecert.compile import precision\n",
    "def f():\n    from scalecert import compile\n",
    "import scalecert.compile.build as b\n",
    "def f():\n    from ..compile import tensorrt\n",
    "import importlib\nimportlib.import_module('scalecert.compile.tensorrt')\n",
])
def test_compile_import_check_can_fail(source):
    imported = _imported_modules(source, "scalecert.export.split")
    assert any(m == "scalecert.compile" or m.startswith("scalecert.compile.") for m in imported), imported


# --- (b2) layers point one way, no import cycles -----------------------------------------------------

# The layer order, lowest first: a module may import its own layer and the ones below, never one above.
LAYERS = ("core", "bundle", "runtime", "api", "export", "compile", "training", "evaluation", "cli")
# "api" is the package root (scalecert/__init__.py: `scalecert.load` and the lazily loaded runtime
# names). Below every layer, shared by all: these modules and the root's __version__.
LEAVES = ("scalecert.errors", "scalecert.graph", "scalecert.tables", "scalecert.__version__")


def _layer(module: str) -> int:
    """Rank in LAYERS (-1: a leaf); a scalecert module in no layer fails, so a new package is placed."""
    if any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES):
        return -1
    parts = module.split(".")
    name = "api" if len(parts) == 1 else parts[1]
    assert parts[0] == "scalecert" and name in LAYERS, f"{module}: in no layer; add it to LAYERS or LEAVES"
    return LAYERS.index(name)


def _package_sources(package_dir: str) -> dict[str, tuple[str, bool]]:
    """{module: (source, is_package)} of every .py file under a `scalecert` folder (this one or a temp tree)."""
    top = os.path.dirname(package_dir)
    out = {}
    for path in _source_files(package_dir):
        rel = os.path.relpath(path, top)[:-3].split(os.sep)
        package = rel[-1] == "__init__"
        with open(path) as f:
            out[".".join(rel[:-1] if package else rel)] = (f.read(), package)
    return out


def _import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, dict[str, int]]:
    """module -> {scalecert module it imports: first line}, imports in function bodies included.
    `from a import b` is the module a.b where that is one, else a (a name from a's __init__), so a
    submodule importing a sibling through its package (`from . import manifest`) does not count as
    importing the package's __init__; the root's __version__ is a leaf of its own."""
    graph = {}
    for module, (source, package) in sources.items():
        edges = {}
        for base, name, line in _imports(source, module, package):
            if base.split(".")[0] != "scalecert":
                continue
            if name is not None and f"{base}.{name}" in sources:
                target = f"{base}.{name}"
            elif base == "scalecert" and name == "__version__":
                target = "scalecert.__version__"
            else:
                target = base
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _upward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """`module:line imports target` for every import of a layer above the importer's own."""
    return sorted(f"{module}:{line} ({LAYERS[_layer(module)] if _layer(module) >= 0 else 'leaf'}) imports {target} "
                  f"({LAYERS[_layer(target)] if _layer(target) >= 0 else 'leaf'})"
                  for module, edges in _import_graph(sources).items() for target, line in edges.items()
                  if _layer(target) > _layer(module))


def _import_cycles(sources: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """The strongly connected components of the import graph with more than one module (Tarjan)."""
    graph = _import_graph(sources)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_layers_point_one_way():
    sources = _package_sources(PACKAGE)
    assert len(sources) >= 60 and {_layer(m) for m in sources} == set(range(-1, len(LAYERS)))  # every layer seen
    assert not _upward_imports(sources), _upward_imports(sources)


def test_no_import_cycles():
    cycles = _import_cycles(_package_sources(PACKAGE))
    assert not cycles, cycles


@pytest.mark.parametrize("module, planted, found", [
    ("scalecert.core.geometry", "def f():\n    from scalecert.runtime import pipelines\n",
     "scalecert.runtime.pipelines"),
    ("scalecert.bundle.staging", "def f():\n    from ..export import locality\n", "scalecert.export.locality"),
    ("scalecert.runtime.doctor", "import scalecert.compile.build\n", "scalecert.compile.build"),
    ("scalecert.export.split", "import importlib\nimportlib.import_module('scalecert.training.tune')\n",
     "scalecert.training.tune"),
    ("scalecert.graph", "from scalecert.core import geometry\n", "scalecert.core.geometry"),
    ("scalecert.runtime.images", "from scalecert import load\n", "scalecert"),
])
def test_layer_check_can_fail(module, planted, found):
    """Negative control: one planted back-edge in the real tree, and the check names it."""
    sources = _package_sources(PACKAGE)
    source, package = sources[module]
    sources[module] = (source + planted, package)
    bad = _upward_imports(sources)
    assert len(bad) == 1 and bad[0].startswith(f"{module}:") and f" imports {found} (" in bad[0], bad


def test_cycle_check_can_fail(tmp_path):
    """Negative controls: a cycle through evaluation/folder.py planted into the real tree (by a
    function-level import in the module it imports its rows from), and a cycle of three modules in
    a temp tree, where a package importing its own submodules (which import siblings through it)
    is no cycle."""
    sources = _package_sources(PACKAGE)
    source, package = sources["scalecert.evaluation.results_file"]
    sources["scalecert.evaluation.results_file"] = (source + "def f():\n    from . import folder\n", package)
    cycles = _import_cycles(sources)
    planted = {"scalecert.evaluation.folder", "scalecert.evaluation.results_file"}
    assert [c for c in cycles if planted <= set(c)], cycles

    tree = tmp_path / "scalecert"
    files = {"__init__.py": "", "core/__init__.py": "from .a import x\n", "core/a.py": "from . import b\nx = 1\n",
             "core/b.py": "def f():\n    from scalecert.core.c import y\n",
             "core/c.py": "import scalecert.core.a\ny = 2\n", "core/d.py": "from scalecert.core import x\n"}
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    assert _import_cycles(_package_sources(str(tree))) == [["scalecert.core.a", "scalecert.core.b", "scalecert.core.c"]]
    (tree / "core" / "c.py").write_text("y = 2\n")
    assert _import_cycles(_package_sources(str(tree))) == []


# --- (c) no private names across packages -------------------------------------------------------------


def test_no_private_imports_across_packages():
    files = _source_files(PACKAGE, os.path.join(ROOT, "benchmarks"))
    assert len(files) >= 50
    bad = []
    for path in files:
        with open(path) as f:
            bad += _private_imports(f.read(), _module_name(path), path.endswith("__init__.py"))
    assert not bad, bad


def test_private_import_check_can_fail():
    assert _private_imports("from scalecert.export.loading import _safe_load\n", "scalecert.training.tune")
    assert _private_imports("def f():\n    from ..export.loading import load_model, _unpickle\n", "scalecert.training.tune")
    assert _private_imports("from scalecert.runtime.pipelines._x import y\n", "scalecert.cli.certify")
    assert _private_imports("from scalecert.cli.app import _guard\n", "benchmarks.attack")
    # allowed: the same top package, dunders, public names
    assert not _private_imports("from scalecert.cli.app import _guard, main\n", "scalecert.cli.export")
    assert not _private_imports("from .app import _guard\n", "scalecert.cli.export")
    assert not _private_imports("from scalecert import __version__\n", "scalecert.export", is_package=True)
    assert not _private_imports("from scalecert.export.loading import load_model\n", "scalecert.training.tune")


# --- (d) the CLI's choices ------------------------------------------------------------------------------


def _choice_options(name: str):
    """(command, choices) of every click.Choice option called `name` on the scalecert commands."""
    from scalecert.cli import export_main, main

    commands = {**main.commands, "scalecert-export": export_main}
    return {command: tuple(param.type.choices) for command, cmd in commands.items() for param in cmd.params
            if param.name == name and isinstance(param.type, click.Choice)}


def test_cli_backend_and_precision_choices_are_the_registries():
    from scalecert.bundle.manifest import PRECISIONS
    from scalecert.runtime.pipelines import CHOICES

    backends, precisions = _choice_options("backend"), _choice_options("precision")
    assert {"certify", "build"} <= set(backends) and {"certify", "build"} <= set(precisions)
    assert backends["certify"] == CHOICES
    # build measures a margin on a named backend: every choice but "auto", in the registry's order
    assert backends["build"] == tuple(c for c in CHOICES if c != "auto")
    assert not {c: v for c, v in backends.items() if not set(v) <= set(CHOICES)}
    assert {c: v for c, v in precisions.items()} == {c: PRECISIONS for c in precisions}

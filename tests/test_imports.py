"""No import cycles in the negguide package: every module imports on its own, first, in a fresh interpreter.

An import cycle that works in one order only (``a`` imports ``b`` imports ``a``) fails here for the
order that breaks it: each module is the first negguide module its interpreter imports. A cycle that
never fails, because one side imports inside a function, is found by reading the import statements.
The modules are the packages listed in ``pyproject.toml`` (``[tool.setuptools] packages``, folders
from ``package-dir``) and every ``.py`` file in them.

Importing torch and diffusers takes seconds, so one interpreter imports the third-party libraries
once and forks a child per module (where the platform forks): each child starts with no negguide
module loaded, which is all a fresh interpreter means for negguide's own import order.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

#: third-party libraries imported once before the children fork (none of them imports negguide)
PRELOAD = ("click", "numpy", "PIL.Image", "pluggy", "pydantic", "torch", "diffusers", "transformers")

#: modules in no import cycle, not even through imports inside functions: the whole package
STATIC = ("negguide",)

# Run as `python -c CHECK MODULES_JSON PRELOAD_JSON`; prints {module: traceback or ""} as JSON.
CHECK = textwrap.dedent(
    """
    import importlib, json, os, subprocess, sys, tempfile, traceback

    modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    early = sorted(m for m in sys.modules if m.split(".")[0] in {n.split(".")[0] for n in modules})
    if early:
        sys.exit(f"imported before the check: {early}")

    def forked(name, path):
        try:
            importlib.import_module(name)
        except BaseException:
            with open(path, "w") as f:
                f.write(traceback.format_exc())
            os._exit(1)
        os._exit(0)

    results = {}
    if not hasattr(os, "fork"):
        for name in modules:
            run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
            results[name] = run.stderr if run.returncode else ""
    else:
        folder = tempfile.mkdtemp()
        pending, running = list(enumerate(modules)), {}
        while pending or running:
            while pending and len(running) < (os.cpu_count() or 1):
                i, name = pending.pop(0)
                path = os.path.join(folder, f"{i}.txt")
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    forked(name, path)
                running[pid] = (name, path)
            pid, status = os.wait()
            name, path = running.pop(pid)
            if status == 0:
                results[name] = ""
            elif os.path.exists(path):
                results[name] = open(path).read()
            else:
                results[name] = f"the child importing {name} died (wait status {status})"
    print(json.dumps(results))
    """
)


def check_imports(modules: list[str], preload: tuple[str, ...] = (), **run: object) -> dict[str, str]:
    """Import each module first in a fresh interpreter; the traceback of each that fails, by name."""
    args = [sys.executable, "-c", CHECK, json.dumps(modules), json.dumps(list(preload))]
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300, **run)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    return {name: error for name, error in results.items() if error}


def package_modules() -> dict[str, Path]:
    """Every module of the packages that ``pyproject.toml`` installs, packages included, with its file."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages, folders = setuptools["packages"], setuptools.get("package-dir", {})

    def folder(package: str) -> Path:
        if package in folders:
            return ROOT / folders[package]
        parent, _, leaf = package.rpartition(".")
        return folder(parent) / leaf if parent else ROOT / package

    modules = {}
    for package in packages:
        modules[package] = folder(package) / "__init__.py"
        for path in sorted(folder(package).iterdir()):
            if path.suffix == ".py" and path.stem != "__init__":
                modules[f"{package}.{path.stem}"] = path
            elif (path / "__init__.py").is_file():
                assert f"{package}.{path.name}" in packages, (
                    f"{path.relative_to(ROOT)} is a package but pyproject.toml does not list "
                    f"{package}.{path.name!r} in [tool.setuptools] packages; a wheel would leave it out"
                )
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Which of ``modules`` each one imports, anywhere: at the top, in a function or under TYPE_CHECKING."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from negguide import tiny` names the module negguide.tiny; `from negguide import apply`, negguide
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        # importing negguide.cli.demo runs negguide.cli first: the packages above count, unless above `name` too
        own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        found |= {other.rsplit(".", i)[0] for other in found for i in range(1, other.count(".") + 1)} - own
        graph[name] = {other for other in found if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a cycle (strongly connected components), sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return sorted(found)


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = list(package_modules())
    assert {"negguide", "negguide.cli", "negguide.cli.demo", "negguide.params", "negguide.toyworld.cli"} <= set(modules)
    failed = check_imports(modules, PRELOAD)
    assert not failed, "\n".join(f"`import {name}` fails on its own:\n{error}" for name, error in failed.items())


def test_a_cycle_that_works_in_one_order_only_is_caught(tmp_path):
    """The check itself: ``pkg.a`` imports fine first; ``pkg.b`` first meets a half-initialised ``pkg.a``."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("X = 1\nfrom pkg.b import Y\n")
    (package / "b.py").write_text("from pkg.a import X\nY = 2\n")
    (package / "c.py").write_text("import json\n")
    failed = check_imports(["pkg", "pkg.a", "pkg.b", "pkg.c"], cwd=tmp_path)
    assert set(failed) == {"pkg.b"}
    assert "circular import" in failed["pkg.b"]


def test_the_command_line_modules_are_in_no_import_cycle_even_inside_functions():
    """A cycle through an import inside a function never fails, but still ties two concerns together.

    ``negguide.cli`` once imported ToyWorld's commands, which imported ``parse_param`` back from it.
    """
    tangled = [group for group in cycles(import_graph(package_modules())) if any(m.startswith(STATIC) for m in group)]
    assert not tangled, "\n".join(
        f"these modules import each other in a cycle: {', '.join(group)}; move what they share into a module "
        "that imports none of them"
        for group in tangled
    )


def test_cycles_finds_each_group_of_modules_that_import_each_other():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []

"""Module dependencies point one way: no import cycles, models/ never needs harness/, no one's privates.

The rules are read from the source with ``ast`` (every import statement, at any depth, counts), so
they hold for code paths the other tests never execute.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx  # a torch dependency
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "models")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported from, name taken from it or None) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(base, alias.name) for alias in node.names]
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a import b`` points at ``a.b`` when that is a module)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for source, name in imported_names(module, path):
            target = f"{source}.{name}" if f"{source}.{name}" in modules else source
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Groups of modules that reach each other through imports (strongly connected, more than one)."""
    groups = nx.strongly_connected_components(nx.DiGraph(graph))
    return sorted((group for group in groups if len(group) > 1), key=sorted)


def private_imports(modules: dict[str, Path], project: tuple[str, ...]) -> list[str]:
    """``from X import _name`` and ``X._name`` where X is another project module (dunders are public)."""
    found = []
    for module, path in modules.items():
        for source, name in imported_names(module, path):
            if name and is_private(name) and source.split(".")[0] in project and source != module:
                found.append(f"{module}: from {source} import {name}")
        aliases = module_aliases(path, project)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            owner = node.value.id if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) else None
            if owner in aliases and is_private(node.attr):
                found.append(f"{module}: {aliases[owner]}.{node.attr}")
    return found


def module_aliases(path: Path, project: tuple[str, ...]) -> dict[str, str]:
    """Local name -> project module, for ``import a.b as x`` and ``from a import b`` (b a module)."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in project:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in project:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ---------------------------------------------------------------- the rules, on this codebase


def test_no_import_cycle_among_harness_and_models() -> None:
    graph = import_graph(module_files(REPO, PACKAGES))
    assert len(graph) > 20 and "harness.config" in graph["harness.matrix"]  # the walk found the code
    assert tangles(graph) == []


ENTRY = {"harness", "harness.__main__", "harness.cli"}  # the command line and the lazy public names: above all


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to: its own when it is one, else its parent's; the entry points stand apart."""
    if module in ENTRY:
        return "entry"
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def package_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph(modules).items():
        home = package_of(module, modules)
        graph.setdefault(home, set()).update(package_of(t, modules) for t in targets if package_of(t, modules) != home)
    return graph


def test_no_import_cycle_among_packages() -> None:
    """Dependencies point one way between packages too: the core (``harness``'s own modules) under the executors
    (``harness.engine``), both under the study driver (``harness.study``) and the tuner (``harness.tune``)."""
    modules = module_files(REPO, PACKAGES)
    graph = package_graph(modules)
    assert {"harness", "harness.engine", "harness.study", "harness.tune", "entry"} <= set(graph)  # the walk found them
    assert "harness" in graph["harness.engine"] and "harness.engine" in graph["harness.study"]  # edges are seen
    assert tangles(graph) == []
    assert not graph["harness"] & {"harness.engine", "harness.study", "harness.tune", "harness.report", "entry"}


def test_models_import_nothing_from_harness() -> None:
    modules = module_files(REPO, ("models",))
    used = {f"{m}: {source}" for m, path in modules.items() for source, _ in imported_names(m, path)}
    assert "models.factory: models.gpt" in used  # imports are seen
    assert not [u for u in used if u.split(": ")[1].split(".")[0] == "harness"]


def in_config(module: str) -> bool:
    return module == "harness.config" or module.startswith("harness.config.")


def test_config_is_the_bottom_layer_of_the_harness() -> None:
    """Specs are read and checked anywhere (a login node without a GPU, ``harness report``): ``harness.config`` uses
    no other module of the project than ``models.config``; what the machine has is ``harness.preflight``'s."""
    modules = module_files(REPO, PACKAGES)
    config = {module: path for module, path in modules.items() if in_config(module)}
    assert len(config) > 1  # the package and its parts
    used = {source for module, path in config.items() for source, _ in imported_names(module, path)}
    assert "harness.config.schema" in used  # imports are seen
    outside = {source for source in used if source.split(".")[0] in PACKAGES and not in_config(source)}
    assert outside == {"models.config"}


def test_no_module_uses_another_modules_private_names() -> None:
    modules = module_files(REPO, (*PACKAGES, "tests"))
    assert private_imports(modules, (*PACKAGES, "tests")) == []


@pytest.mark.parametrize(
    ("statement", "heavy"),
    [
        ("import harness.cli", ("torch", "mlflow", "optuna")),
        ("import harness.config", ("torch", "mlflow", "optuna")),
        ("import models.config", ("torch", "harness")),
    ],
)
def test_light_imports_stay_light(statement: str, heavy: tuple[str, ...]) -> None:
    """The CLI parser and spec loading start without torch/MLflow/Optuna (seconds to import); model configs need
    no harness."""
    probe = f"import sys; {statement}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


# ---------------------------------------------------------------- the checks catch what they are for


TANGLED = {
    "pkg/__init__.py": "",
    "pkg/a.py": "def f():\n    from pkg import b  # local imports count too\n",
    "pkg/b.py": "from .c import _hidden\n",
    "pkg/c.py": "import pkg.a as alias\n\n_hidden = alias._secret\n",
}
ONE_WAY = {
    "pkg/__init__.py": "from pkg.a import f\n\n__all__ = ['f']\n",
    "pkg/a.py": "from pkg import b\n\ndef f():\n    return b.g(), b.__name__\n",
    "pkg/b.py": "def _own():\n    return 1\n\ndef g():\n    return _own()\n",
}


@pytest.mark.parametrize(
    ("files", "expected_tangles", "expected_private"),
    [
        (TANGLED, [{"pkg.a", "pkg.b", "pkg.c"}], ["pkg.b: from pkg.c import _hidden", "pkg.c: pkg.a._secret"]),
        (ONE_WAY, [], []),
    ],
    ids=["tangled", "one-way"],
)
def test_checks_catch_cycles_and_private_use(
    tmp_path: Path, files: dict[str, str], expected_tangles: list[set[str]], expected_private: list[str]
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = module_files(tmp_path, ("pkg",))
    assert tangles(import_graph(modules)) == expected_tangles
    assert private_imports(modules, ("pkg",)) == expected_private


MAX_FUNCTION_LINES = 60
LONG_OK = "# long:"  # on a function's ``def`` line: the one-line reason it cannot be split


def long_functions(modules: dict[str, Path]) -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines without a ``# long:`` reason on their def line."""
    found = []
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_OK not in lines[node.lineno - 1]:
                    found.append(f"{module}.{node.name}: {length} lines")
    return found


def test_functions_fit_on_a_screen(tmp_path: Path) -> None:
    assert long_functions(module_files(REPO, PACKAGES)) == []
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(f"def f():\n{long_body}\n\ndef g():  {LONG_OK} a table\n{long_body}\n")
    assert long_functions(module_files(tmp_path, ("pkg",))) == ["pkg.mod.f: 61 lines"]  # the check sees them


ARCHITECTURE = REPO / "docs" / "architecture.md"
NAMED_PATH = re.compile(r"\b((?:harness|models|tests|docs|scripts|studies)/[\w/.*-]*[\w*/])")
MODULE_LIST = re.compile(r"`((?:harness|models)/[\w/]+/)` \(([^)]*)\)")


def named_files(text: str) -> set[str]:
    """Every path the page names, and ``package/module.py`` for each module a package's list names."""
    names = set(NAMED_PATH.findall(text))
    for package, listed in MODULE_LIST.findall(text):
        names |= {f"{package}{module}.py" for module in re.findall(r"`(\w+)`", listed)}
    return names


def test_the_architecture_page_names_files_that_exist_and_every_core_module() -> None:
    text = ARCHITECTURE.read_text()
    names = named_files(text)
    assert {"harness/study/driver.py", "harness/engine/in_process.py", "harness/report/gather.py"} <= names
    missing = sorted(name for name in names if not any(REPO.glob(name.rstrip("/"))))
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"
    documented = {name for name in names if name.endswith(".py")}
    core = [path for folder in ("harness", "harness/engine", "harness/study") for path in (REPO / folder).glob("*.py")]
    unnamed = sorted(str(path.relative_to(REPO)) for path in core if path.name != "__init__.py")
    unnamed = [name for name in unnamed if name not in documented]
    assert unnamed == [], f"docs/architecture.md does not say what these modules own: {unnamed}"

"""The house rules, read from the source with ``ast`` (nothing is imported).

- no import cycle inside ``tasks/``, ``routing/`` or ``models/``, counting
  every import: inside functions and under ``if TYPE_CHECKING:`` too;
- no ``_private`` name imported from, or read off, another project module;
- the layering of /work/shared/DESIGN.md: ``routing`` never imports torch or
  celery, ``models`` never imports celery, no package imports one above it
  (benchmarks -> tasks -> routing -> models), and inside ``tasks/`` the
  ``client/`` and ``worker/`` folders never import each other.

The checks run on a small fake tree first, so each one is shown to fail when
its rule is broken.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "routing", "models", "benchmarks")
CYCLE_FREE = ("tasks", "routing", "models")
LAYERS = {"models": 0, "routing": 1, "tasks": 2, "benchmarks": 3}
FORBIDDEN_THIRD_PARTY = {"routing": ("torch", "celery"), "models": ("celery",)}
APART = ("tasks.client", "tasks.worker")  # never import each other


@dataclass
class Import:
    line: int
    target: str  # the project module (or third-party top-level name) imported
    names: tuple[str, ...] = ()  # names taken with ``from target import ...``


@dataclass
class Module:
    name: str
    path: Path
    imports: list[Import] = field(default_factory=list)
    private_reads: list[tuple[int, str]] = field(default_factory=list)  # (line, "mod._name")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Parse every module of ``packages`` under ``root``."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(root, p): Module(module_name(root, p), p) for p in files}
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
        package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
        bound: dict[str, str] = {}  # local name -> project module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name if alias.name in modules else alias.name.split(".")[0]
                    mod.imports.append(Import(node.lineno, target))
                    if alias.asname and alias.name in modules:
                        bound[alias.asname] = alias.name
                    elif alias.name in modules:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # ``from tasks.worker import metrics``: a module
                        mod.imports.append(Import(node.lineno, sub))
                        bound[alias.asname or alias.name] = sub
                    else:
                        target = base if base in modules else base.split(".")[0]
                        mod.imports.append(Import(node.lineno, target, (alias.name,)))
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
            ):
                mod.private_reads.append((node.lineno, f"{bound[node.value.id]}.{node.attr}"))
    return modules


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def cycles(modules: dict[str, Module], packages: tuple[str, ...] = CYCLE_FREE) -> list[list[str]]:
    """Every import cycle among the modules of ``packages`` (one path per cycle found)."""
    inside = {n for n in modules if n.split(".")[0] in packages}
    graph = {
        n: sorted({i.target for i in modules[n].imports if i.target in inside and i.target != n})
        for n in inside
    }
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def private_imports(modules: dict[str, Module]) -> list[str]:
    """``module:line name`` for each private name taken from another project module."""
    bad = []
    for mod in modules.values():
        uses = [
            (imp.line, f"{imp.target}.{n}")
            for imp in mod.imports
            if imp.target in modules and imp.target != mod.name
            for n in imp.names
            if _private(n)
        ]
        uses += [(line, d) for line, d in mod.private_reads if d.rpartition(".")[0] != mod.name]
        bad += [f"{mod.name}:{line} {d}" for line, d in sorted(uses) if not _justified(mod, line)]
    return bad


def _justified(mod: Module, line: int) -> bool:
    """Benchmarks may use a private name with a ``# private: why`` comment on that line."""
    text = mod.path.read_text().splitlines()[line - 1]
    return mod.name.split(".")[0] == "benchmarks" and "# private:" in text


def layering(modules: dict[str, Module]) -> list[str]:
    """Imports that break the dependency rules."""
    bad = []
    for mod in modules.values():
        top = mod.name.split(".")[0]
        for imp in mod.imports:
            target_top = imp.target.split(".")[0]
            where = f"{mod.name}:{imp.line} imports {imp.target}"
            if target_top in FORBIDDEN_THIRD_PARTY.get(top, ()):
                bad.append(where)
            if target_top in LAYERS and LAYERS[target_top] > LAYERS[top]:
                bad.append(f"{where} (a package above it)")
            for side, other in (APART, APART[::-1]):
                if _within(mod.name, side) and _within(imp.target, other):
                    bad.append(f"{where} ({side} never imports {other})")
    return bad


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# --- the rules, on the real tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> dict[str, Module]:
    modules = scan(ROOT)
    assert {"tasks.app", "tasks.worker.runtime", "routing.router", "models.runner"} <= set(modules)
    return modules


def test_no_import_cycles(project: dict[str, Module]) -> None:
    assert cycles(project) == []


def test_no_private_name_crosses_a_module(project: dict[str, Module]) -> None:
    assert private_imports(project) == []


def test_layering_of_the_design(project: dict[str, Module]) -> None:
    assert layering(project) == []


# --- each check fails when its rule is broken ----------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(tmp_path)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "tasks/__init__.py": "",
            "tasks/a.py": "from tasks.b import x\n",
            "tasks/b.py": "def f():\n    from tasks import a\n",
            "tasks/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks.d import y\n",
            "tasks/d.py": "import tasks.c\n",
            "tasks/e.py": "import tasks.a\n",
        },
    )
    assert cycles(modules) == [["tasks.a", "tasks.b", "tasks.a"], ["tasks.c", "tasks.d", "tasks.c"]]


def test_private_names_are_found_both_ways(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "tasks/__init__.py": "",
            "tasks/a.py": "_router = None\n",
            "tasks/b.py": "from tasks.a import _router\n",
            "tasks/c.py": "from tasks import a\n\nx = a._router\n",
            "tasks/d.py": "from tasks.a import __doc__\n",
            "benchmarks/__init__.py": "",
            "benchmarks/e.py": "from tasks import a\n\nx = a._router  # private: measured as is\n",
        },
    )
    assert private_imports(modules) == ["tasks.b:1 tasks.a._router", "tasks.c:3 tasks.a._router"]


def test_layering_breaks_are_found(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "routing/__init__.py": "import torch\n",
            "models/__init__.py": "from routing import x\n",
            "tasks/__init__.py": "",
            "tasks/client/__init__.py": "",
            "tasks/client/r.py": "def f():\n    from tasks.worker import m\n",
            "tasks/worker/__init__.py": "",
            "tasks/worker/m.py": "",
        },
    )
    assert sorted(layering(modules)) == [
        "models:1 imports routing (a package above it)",
        "routing:1 imports torch",
        "tasks.client.r:2 imports tasks.worker.m (tasks.client never imports tasks.worker)",
    ]

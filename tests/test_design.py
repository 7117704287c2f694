"""docs/design.md's module map holds: every import of every bpjax module, read from its source.

The rules (docs/design.md, "Module map"): a unit imports only the units listed beside it; no
module imports a private name of another module or reads one off an imported module; a private
module is imported only from inside its own package; no import cycle, except through a PEP 562
module ``__getattr__`` that keeps a moved name importable from its old place.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bpjax"
DESIGN = ROOT / "docs" / "design.md"
SHARED = ("bpjax._types", "bpjax._trees", "bpjax._cache")  # imported by any unit


class Import(NamedTuple):
    module: str  # the importing module, e.g. "bpjax.check.network"
    target: str  # the imported bpjax module, e.g. "bpjax.layers._core"
    names: tuple[str, ...]  # the names taken from it ("from target import a, b")
    line: int
    lazy_alias: bool  # inside a module-level __getattr__ (PEP 562)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy_lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lazy_lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bpjax"):
                    yield Import(module, alias.name, (), node.lineno, node.lineno in lazy_lines)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if not target.startswith("bpjax"):
                continue
            names = tuple(a.name for a in node.names)
            # "from bpjax import extend" imports the module bpjax.extend
            submodules = [n for n in names if f"{target}.{n}" in modules]
            for name in submodules:
                yield Import(module, f"{target}.{name}", (), node.lineno, node.lineno in lazy_lines)
            rest = tuple(n for n in names if n not in submodules)
            if rest:
                yield Import(module, target, rest, node.lineno, node.lineno in lazy_lines)


def _all_imports() -> list[Import]:
    modules = _modules()
    return [imp for name, path in modules.items() for imp in _imports(name, path, modules)]


def _module_aliases(path: Path, modules: dict[str, Path]) -> dict[str, str]:
    """Local names bound to bpjax modules: ``from bpjax import extend as _extend`` → _extend."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def _map() -> dict[str, set[str]]:
    text = DESIGN.read_text()
    block = text.split("<!-- map:start -->")[1].split("<!-- map:end -->")[0]
    allowed: dict[str, set[str]] = {}
    for row in block.strip().splitlines()[2:]:
        unit_cell, deps_cell = row.strip().strip("|").split("|")
        (unit,) = re.findall(r"`([\w.]+)`", unit_cell)
        allowed[unit] = set(re.findall(r"`([\w.]+)`", deps_cell))
    return allowed


def _unit(module: str, units: set[str]) -> str | None:
    """The unit a module belongs to: the longest unit that is it or a package above it."""
    best = None
    for unit in units:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best or ""):
            best = unit
    return best


def _is_private(module: str) -> bool:
    return any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:])


def _package(module: str, modules: dict[str, Path]) -> str:
    """The package a module lives in (itself, for a package's __init__)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def test_the_map_names_every_module_and_is_acyclic():
    allowed, modules = _map(), _modules()
    units = set(allowed)
    unmapped = [m for m in modules if m != "bpjax" and m not in SHARED and _unit(m, units) is None]
    assert not unmapped, f"modules outside the map in docs/design.md: {unmapped}"
    unknown = {dep for deps in allowed.values() for dep in deps} - units
    assert not unknown, f"the map lists units that do not exist as rows: {sorted(unknown)}"
    # the map is a DAG: a topological order exists
    order, pending = [], dict(allowed)
    while pending:
        ready = [u for u, deps in pending.items() if deps <= set(order)]
        assert ready, f"the map in docs/design.md has a cycle among {sorted(pending)}"
        order += ready
        for u in ready:
            del pending[u]


def test_every_import_follows_the_map():
    allowed, modules = _map(), _modules()
    units = set(allowed)
    bad = []
    for imp in _all_imports():
        if imp.module == "bpjax" or imp.lazy_alias:
            continue
        target = imp.target
        if target == "bpjax":  # "import bpjax as bp" or "from bpjax import X": the public API
            if imp.names:
                targets = {_unit(f"bpjax.{n}", units) or "bpjax" for n in imp.names}
            else:
                targets = {"bpjax"}
        elif target in SHARED or target.split(".")[0] != "bpjax":
            continue
        else:
            targets = {_unit(target, units) or target}
        own = _unit(imp.module, units)
        for t in targets:
            if t == own:
                continue
            if t == "bpjax" and own == "bpjax.cli":
                continue  # the command line uses the public API, as users do
            if own is None or t not in allowed[own]:
                bad.append(f"{imp.module}:{imp.line} imports {t}, not in {own}'s row")
    assert not bad, "imports against docs/design.md's map:\n" + "\n".join(bad)
    del modules


def test_no_private_name_crosses_a_module():
    modules = _modules()
    bad = []
    for imp in _all_imports():
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and imp.target != imp.module:
            bad.append(f"{imp.module}:{imp.line} imports {private} from {imp.target}")
        if (
            _is_private(imp.target)
            and imp.target not in SHARED
            and not imp.module.startswith(_package(imp.target, modules) + ".")
            and imp.module != _package(imp.target, modules)
        ):
            bad.append(f"{imp.module}:{imp.line} imports the private module {imp.target}")
    for name, path in modules.items():
        aliases = _module_aliases(path, modules)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names crossing modules:\n" + "\n".join(bad)


def test_no_import_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in _all_imports():
        if imp.lazy_alias or imp.module == "bpjax":
            continue
        target = imp.target if imp.target in modules else None
        if target is None or target == imp.module:
            continue
        graph[imp.module].add(target)
        # importing bpjax.p.a from outside bpjax.p runs bpjax/p/__init__.py first
        parts = target.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            if not imp.module.startswith(package + ".") and imp.module != package:
                graph[imp.module].add(package)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("limit", [650])
def test_no_source_file_is_much_over_600_lines(limit):
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > limit
    }
    assert not long, f"split these by concern (docs/design.md): {long}"


def test_docstrings_cite_only_what_ships():
    """Code cites docs/ in the repository, never an internal note such as DESIGN.md."""
    cited = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "DESIGN.md" in line
    ]
    assert not cited, f"point these at docs/design.md: {cited}"

"""The package's layering, read from the code with ``ast`` and held against docs/ARCHITECTURE.md.

Each folder of ``src/xray`` is a library layer and the top-level modules are the commands. A module may
import its own layer or a lower one, never a higher one; no import cycle; and no project module is
imported inside a function (the way import cycles used to be hidden).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "xray"
ARCHITECTURE = PROJECT_ROOT / "docs" / "ARCHITECTURE.md"
COMMANDS = "commands"


def documented_layers() -> list[str]:
    """Layer names in order, from the rows ``| N | name | ... |`` of ARCHITECTURE.md's layer table."""
    rows = re.findall(r"^\| (\d+) \| `?(\w+)`? \|", ARCHITECTURE.read_text(), flags=re.MULTILINE)
    assert rows, f"{ARCHITECTURE}: no layer table (rows '| 1 | core | ...')"
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1)), "layer rows must be numbered 1..N"
    return [name for _, name in rows]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"  # xray/__init__.py: imports nothing of its own
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return COMMANDS


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import of ``xray`` in ``path``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(
                    (a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "xray"
                )
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and (child.module or "").split(".")[0] == "xray"
            ):
                for alias in child.names:  # `from xray.data import io` imports the module xray.data.io
                    submodule = f"{child.module}.{alias.name}"
                    found.append(
                        (submodule if submodule in MODULES else child.module, child.lineno, in_function)
                    )
            elif isinstance(child, ast.ImportFrom) and child.level > 0:
                found.append((f"<relative import> {ast.unparse(child)}", child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def test_every_folder_is_a_documented_layer_and_commands_come_last() -> None:
    layers = documented_layers()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert sorted(set(layers) - {COMMANDS}) == folders, (
        "ARCHITECTURE.md's layers must name every package folder"
    )
    assert layers[-1] == COMMANDS


def test_no_relative_imports_and_every_import_resolves() -> None:
    bad = [
        f"{m}:{line} {target}"
        for m, edges in GRAPH.items()
        for target, line, _ in edges
        if target not in MODULES
    ]
    assert not bad, f"imports that are not project modules (typo or relative import): {bad}"


def test_no_project_module_is_imported_inside_a_function() -> None:
    inside = [
        f"{MODULES[m].relative_to(PROJECT_ROOT)}:{line} imports {t}"
        for m, edges in GRAPH.items()
        for t, line, fn in edges
        if fn
    ]
    assert not inside, "import project modules at the top of the module:\n" + "\n".join(inside)


def test_imports_go_to_the_same_or_a_lower_layer() -> None:
    order = {name: rank for rank, name in enumerate(documented_layers())}
    order["package"] = -1
    upward = [
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, edges in GRAPH.items()
        for t, _, _ in edges
        if t in MODULES and order[layer_of(t)] > order[layer_of(m)]
    ]
    assert not upward, "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target, _, _ in GRAPH[module]:
            if target not in MODULES or target == module:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The rules above can fail: a function-level import and a relative import are both found."""
    source = tmp_path / "m.py"
    source.write_text(
        "from xray.core import errors\n\ndef f():\n    from xray.training import run\n\nfrom . import x\n"
    )
    edges = project_imports(source)
    assert ("xray.core.errors", 1, False) in edges
    assert ("xray.training.run", 4, True) in edges
    assert any(t.startswith("<relative import>") for t, _, _ in edges)


@pytest.mark.parametrize(
    ("old", "new"),
    [("xray.data.download", "python -m xray.download"), ("xray.data.encoding", "python -m xray.encoding")],
)
def test_former_command_names_still_run_the_command(old: str, new: str) -> None:
    """The two commands that left the data layer keep their former ``python -m`` names working."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", old, "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {new}")

"""The house's one rule: imports run down only. A module imports from its own folder or from a folder below it,
so there is no circle between folders and no arrow back up (docs/design.md, "The house")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sdxl_core"
# Lowest first. "core" is every module directly in sdxl_core/ but run.py, which assembles a run from all below it.
LAYERS = (("core",), ("models",), ("quant", "reports"), ("engines",), ("run",), ("commands", "suite"))
RANK = {place: rank for rank, places in enumerate(LAYERS) for place in places}


def place(module: str) -> str:
    """The folder (or run) a dotted `sdxl_core...` module lives in."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "run" if parts[1:2] == ["run"] else "core"


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of the package, lazy ones inside functions too."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sdxl_core"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                found += [(module, target, node.lineno) for target in targets]
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno) for a in node.names if a.name.startswith("sdxl_core")]
    return found


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(RANK), f"give these folders a layer in LAYERS: {sorted(folders - set(RANK))}"


def test_imports_run_down_only():
    upward = [
        f"{source}:{line} imports {target}"
        for source, target, line in imports()
        if place(source) != place(target) and RANK[place(target)] >= RANK[place(source)]
    ]
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)


def test_no_relative_imports():
    """Absolute imports only, so a module's place is read from its import lines alone."""
    relative = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, relative

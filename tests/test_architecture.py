"""The room table of DESIGN.md holds: imports only point down.

positions/ -> torch, pydantic, jaxtyping (no learned weights, nothing above it)
seqpe_nd/  -> seqpe_nd.positions (never tasks, transformers, timm, datasets)
tasks/     -> everything
Code always imports ``seqpe_nd.…``, never the folder names ``positions`` or ``tasks``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY_ABOVE_CORE = {"transformers", "timm", "datasets", "tokenizers", "torchvision"}


def imports(path: Path) -> set[str]:
    """Every absolute import of a module, function-level ones included, as ``module`` and ``module.name``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("positions"), ids=lambda p: p.name)
def test_positions_import_nothing_above(path):
    bad = {m for m in imports(path) if m.startswith(("seqpe_nd.encodings", "seqpe_nd.tasks", "seqpe_nd.encoder", "seqpe_nd.regularizers")) or m.split(".")[0] in THIRD_PARTY_ABOVE_CORE}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    text = path.read_text()
    assert "nn.Module" not in text and "nn.Parameter" not in text, f"{path.name}: positions hold no learned weights"


@pytest.mark.parametrize("path", sources("seqpe_nd"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_tasks_or_backbones(path):
    bad = {m for m in imports(path) if m.startswith("seqpe_nd.tasks") or m.split(".")[0] in THIRD_PARTY_ABOVE_CORE}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("folder", ["positions", "seqpe_nd", "tasks", "tests", "benchmarks"])
def test_no_folder_name_imports(folder):
    for path in sources(folder):
        top = {m.split(".")[0] for m in imports(path)}
        assert not top & {"positions", "tasks"}, f"{path.relative_to(ROOT)} imports a folder name; use seqpe_nd.…"


def test_no_future_annotations_in_checked_modules():
    # jaxtyping's hook needs real annotations at run time
    for folder in ("positions", "seqpe_nd", "tasks"):
        for path in sources(folder):
            assert "from __future__ import annotations" not in path.read_text(), path


# --- inside tasks/: folders by role, arrows pointing down -------------------------------------------------

ROLE_IMPORTS: dict[str, set[str]] = {
    "engine": {"engine"},  # the loop, checkpoints, atomic files, evaluation helpers, plots: nothing recipe-specific
    "data": {"data", "engine"},
    "backbones": {"backbones", "engine"},
    "recipes": {"backbones", "data", "engine", "recipes"},
    "cli": {"backbones", "data", "engine", "recipes", "cli"},
}
RECIPE_SHARED = {"seqpe_nd.tasks.recipes", "seqpe_nd.tasks.recipes.base", "seqpe_nd.tasks.recipes.config",
                 "seqpe_nd.tasks.recipes.vit_family"}


def role(path: Path) -> str:
    return path.relative_to(ROOT / "tasks").parts[0]


@pytest.mark.parametrize("path", [p for p in sources("tasks") if p.parent != ROOT / "tasks"], ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_roles_import_only_downward(path: Path) -> None:
    mine = role(path)
    for name in imports(path):
        if not name.startswith("seqpe_nd.tasks."):
            continue
        target = name.split(".")[2]
        assert target in ROLE_IMPORTS[mine], f"{path.relative_to(ROOT)} ({mine}/) imports {name} ({target}/)"


RECIPE_MODULES = sorted(p for p in (ROOT / "tasks" / "recipes").glob("*.py") if p.stem not in ("__init__", "base", "config"))


@pytest.mark.parametrize("path", RECIPE_MODULES, ids=lambda p: p.stem)
def test_recipes_never_import_each_other(path: Path) -> None:
    for name in imports(path):
        parts = name.split(".")
        if name.startswith("seqpe_nd.tasks.recipes") and len(parts) >= 4:
            module = ".".join(parts[:4])
            assert module in RECIPE_SHARED or module == f"seqpe_nd.tasks.recipes.{path.stem}", (
                f"recipe {path.stem} imports {name}: recipes share only base and config"
            )


@pytest.mark.parametrize("folder", ["positions", "seqpe_nd", "tasks", "benchmarks"])
def test_no_private_names_cross_modules(folder: str) -> None:
    for path in sources(folder):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seqpe_nd"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports private {private} from {node.module}"


@pytest.mark.parametrize("path", sources("tasks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 450, f"{path.relative_to(ROOT)} has {lines} lines; split it by what its parts do"

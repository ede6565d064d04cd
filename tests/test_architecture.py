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
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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

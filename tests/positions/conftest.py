"""Spaces of every kind, built from the shipped YAML and from dicts, for parametrised tests."""

from pathlib import Path

import pytest

from seqpe_nd.positions import load_space

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "positions"

SPACES = {
    "1d": {"kind": "grid", "L": 8, "L_max": 120, "contrastive": {"local_window": 20}, "ood": {"num_teachers": 6, "num_starts": 4}},
    "2d": {"kind": "grid", "L": [4, 5], "L_max": [30, 40], "contrastive": {"mix": {"global": 0.4, "global_hard": 0.3, "local": 0.3}, "num_candidates": 16, "local_window": 6}, "ood": {"min_shift": 1.0, "num_teachers": 8, "num_starts": 4}},
    "3d": {"kind": "grid", "L": [2, 3, 3], "L_max": [10, 12, 12], "contrastive": {"mix": {"global": 0.3, "global_hard": 0.4, "local": 0.3}, "num_candidates": 16, "local_window": [4, 5, 5]}, "ood": {"num_teachers": 8, "num_starts": 4}},
    "hybrid": {
        "kind": "hybrid",
        "modalities": [
            {"name": "text", "space": {"L": 16, "L_max": 300}},
            {"name": "image", "space": {"L": [3, 3], "L_max": [20, 20]}},
            {"name": "video", "space": {"L": [2, 3, 3], "L_max": [8, 12, 12]}},
        ],
        "contrastive": {"mix": {"global": 0.4, "global_hard": 0.3, "local": 0.3}, "num_candidates": 16},
        "ood": {"num_teachers": 8, "num_starts": 4},
    },
}
KINDS = list(SPACES)


@pytest.fixture(params=KINDS)
def space(request: pytest.FixtureRequest):
    return load_space(SPACES[request.param])


def shipped_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))

"""A newcomer adds a position-encoding method: its own module plus one line of the union, nothing else.

The test does it for real on a copy of the package: it writes a learned Fourier-feature N-D encoding
(Li et al., 2021) as ``seqpe_nd/encodings/fourier.py``, adds the import and the union line to
``encodings/config.py``, checks that these are the only changes, and trains the new method one step
through the LM recipe with ``seqpe-nd train`` in a fresh interpreter that imports the copy.
"""

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import seqpe_nd
import seqpe_nd.positions
import seqpe_nd.tasks

from tests.tasks.test_lm import tiny_config

FOURIER = '''\
"""Learned Fourier features (Li et al., 2021): cos/sin of a learned projection of the coordinates, through an MLP."""

import math
from typing import Literal

import torch
from jaxtyping import Float
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from seqpe_nd.encodings.base import PEState, PositionEncoding
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.positions import GridSpace, HybridSpace


class Fourier(PositionEncoding):
    method = "fourier"

    def __init__(self, *, d_model: int, features: int, sigma: float, width: int, **attention: int) -> None:
        super().__init__(width=width, **attention)
        self.proj = nn.Parameter(torch.randn(width, features // 2) * sigma)
        self.mlp = nn.Sequential(nn.Linear(features, features), nn.GELU(), nn.Linear(features, d_model))

    def embed(self, state: PEState) -> Float[Tensor, "b n d"]:
        angle = state.pos_q.float() @ self.proj
        return self.mlp(torch.cat([angle.cos(), angle.sin()], dim=-1) / math.sqrt(self.proj.shape[1]))


class FourierConfig(MethodConfig):
    """Learned Fourier features added to the input embeddings, on a grid of any dimensionality."""

    method: Literal["fourier"] = "fourier"
    features: PositiveInt = 16
    sigma: float = Field(0.1, gt=0.0)

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return Fourier(d_model=sizes.d_model, features=self.features, sigma=self.sigma, width=space.width,
                       **sizes.attention)
'''

PROBE = """\
import json, sys
import seqpe_nd
from seqpe_nd.encodings import METHODS
from seqpe_nd.tasks.cli import main

print(json.dumps({"package": seqpe_nd.__file__, "methods": list(METHODS)}))
main(["train", sys.argv[1], "--run-dir", sys.argv[2]])
"""


def copy_package(root: Path) -> Path:
    """The installed package laid out as a source tree (``positions``, ``tasks`` sit inside it, as installed)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = root / "seqpe_nd"
    shutil.copytree(Path(seqpe_nd.__file__).parent, package, ignore=skip)
    for sub in (seqpe_nd.positions, seqpe_nd.tasks):
        shutil.rmtree(package / sub.__name__.split(".")[-1], ignore_errors=True)
        shutil.copytree(Path(sub.__file__).parent, package / sub.__name__.split(".")[-1], ignore=skip)
    return package


@pytest.mark.slow
def test_a_new_method_is_one_module_and_one_union_line_and_trains_through_the_lm_recipe(tmp_path: Path) -> None:
    package = copy_package(tmp_path / "src")
    (package / "encodings" / "fourier.py").write_text(FOURIER)
    union = package / "encodings" / "config.py"
    before = union.read_text()
    after = before.replace(
        "from seqpe_nd.encodings.seqpe import SeqPEConfig\n",
        "from seqpe_nd.encodings.seqpe import SeqPEConfig\nfrom seqpe_nd.encodings.fourier import FourierConfig\n",
    ).replace("    | SeqPEConfig,\n", "    | FourierConfig\n    | SeqPEConfig,\n")
    union.write_text(after)
    changed = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["+from seqpe_nd.encodings.fourier import FourierConfig", "+    | FourierConfig"]

    config = tiny_config(tmp_path, pe={"method": "fourier", "features": 8}, steps=2, log_every=1, save_every=0)
    config["random_shift"] = False
    (tmp_path / "run.json").write_text(json.dumps(config))  # YAML is a superset of JSON
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run.json"), str(run_dir)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.splitlines()[0])
    assert Path(probe["package"]).is_relative_to(tmp_path), "the copy, not the installed package, was imported"
    assert probe["methods"][-2:] == ["fourier", "seqpe"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 2 and all(0.0 < loss < 20.0 for loss in losses)
    saved = json.loads((run_dir / "config.json").read_text())["pe"]
    assert saved == {"method": "fourier", "features": 8, "sigma": 0.1}
    from safetensors import safe_open

    checkpoint = next(run_dir.rglob("model.safetensors"))
    with safe_open(checkpoint, "pt") as weights:
        names = set(weights.keys())
    assert {"pe.proj", "pe.mlp.0.weight", "pe.mlp.2.weight"} <= {n.removeprefix("model.") for n in names}, names


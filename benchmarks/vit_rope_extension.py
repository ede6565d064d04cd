"""Axial RoPE with per-axis context extension on a trained ViT: the Table 3 analogue's rows RoPE axial + PI / YaRN.

The extensions act in evaluation only: the smoke axial-RoPE ViT (``configs/vit/smoke/rope_axial.yaml``,
trained at 24 px, a 6 × 6 patch grid) is evaluated at larger resolutions, plain and with
``pe.scaling`` (one factor per axis: the evaluated grid over the training grid).

    seqpe-nd train configs/vit/smoke/rope_axial.yaml --run-dir runs/bench-vit-ext/rope_axial
    python benchmarks/vit_rope_extension.py
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from seqpe_nd.encodings import load_pe_config
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.recipes.vit import ViTRecipe

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "RoPE axial": None,
    "RoPE axial + PI": {"type": "linear"},
    "RoPE axial + NTK": {"type": "ntk"},
    "RoPE axial + YaRN": {"type": "yarn"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-vit-ext" / "rope_axial")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[24, 36, 48, 72])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = ViTRecipe.from_run(args.run)
    plan = recipe.with_eval(resolutions=args.resolutions).eval_plan()
    model = recipe.load_trained()
    inner = model.pe.inner  # the RoPE under the [CLS] wrapper
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for name, scaling in VARIANTS.items():
        inner.scaling = load_pe_config({**recipe.cfg.pe.model_dump(), "scaling": scaling}).scaling
        inner.original_length = tuple(recipe.cfg.space.L)
        rows[name] = {str(s): recipe.eval_size(model, s, plan, torch.device("cpu"))["top1"] for s in plan.sizes}
        print(name, rows[name], flush=True)
    result = {"run": str(args.run.relative_to(ROOT)), "train_resolution": recipe.cfg.model.img_size,
              "images": plan.context["count"], "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(args.out / "vit_rope_extension.json", json.dumps(result, indent=1) + "\n")
    sizes = [str(s) for s in plan.sizes]
    lines = [f"# Axial RoPE context extension on the trained smoke ViT (top-1 %, trained at {recipe.cfg.model.img_size} px, "
             f"{plan.context['count']} validation images; per-axis factor = evaluated grid / training grid)\n",
             "| method | " + " | ".join(f"{s} px" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{r[s]:.1f}" for s in sizes) + " |" for name, r in rows.items()]
    ckpt.atomic_write_text(args.out / "vit_rope_extension.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Can the regularizers alone teach the encoder L_δ? Encoder learning rate × L_max, smoke settings.

For each shipped SeqPE smoke config (ViT attn_mul, LM), trains the encoder on α·L_δ + β·L_OOD
alone (no task, Adam, the config's space, encoder shape, α and β) at several encoder learning
rates and at the config's own and the unadjusted L_max, then probes L_δ on fresh candidate sets
(`seqpe_nd.regularizers.probe_contrastive`) and the mean cosine between the embeddings of the
training positions (1.0: they are one point to the encoder). Writes
``benchmarks/results/ldelta_lr.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/ldelta_lr.py          # ~3 min on a 2-core CPU
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.positions import load_space
from seqpe_nd.regularizers import probe_contrastive, train_regularizers_alone
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text
from seqpe_nd.tasks.recipes import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = {  # name: (config, the L_max the smoke config had before issue 12)
    "vit": (ROOT / "configs/vit/smoke/seqpe_attn_mul.yaml", [100, 100]),
    "lm": (ROOT / "configs/lm/smoke/seqpe.yaml", 20000),
}
LRS = (3e-3, 1e-3, 3e-4, 1e-4)


def run(config_path: Path, l_max: Any, lr: float, steps: int) -> dict[str, float]:
    config = load_config(config_path)
    space_source = config["space"]
    if isinstance(space_source, str):
        space_source = str(ROOT / space_source)
    space = load_space(space_source)
    fields = {k: v for k, v in space.model_dump(mode="json").items() if k != "k"}  # k follows L_max
    space = load_space({**fields, "L_max": l_max})
    d_model = int(config["model"].get("embed_dim") or config["model"].get("n_embd"))
    heads = int(config["model"].get("num_heads") or config["model"].get("n_head"))
    torch.manual_seed(0)
    pe = build_position_encoding(
        config["pe"], space=space, num_heads=heads, head_dim=d_model // heads, num_layers=1, d_model=d_model
    )
    enc = pe.encoder
    grid = space.positions(space.L).unsqueeze(0)
    t0 = time.perf_counter()
    train_regularizers_alone(
        enc, pe.regularizer, steps, lr=lr, generator=torch.Generator().manual_seed(0), main_pos=grid
    )
    enc.eval()
    probe = probe_contrastive(enc, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        e = F.normalize(enc(space.positions(space.L)), dim=-1)
        cos = float((e @ e.T).mean())
    return {"l_delta": probe.loss, "chance": probe.chance, "top1": probe.top1, "train_cos": cos,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for name, (path, old_l_max) in CASES.items():
        shipped = load_config(path)
        run_lr = float(shipped["train"]["lr"])
        space_source = shipped["space"]
        new_l_max = load_space(str(ROOT / space_source) if isinstance(space_source, str) else space_source).L_max
        for l_max in (old_l_max, list(new_l_max) if len(new_l_max) > 1 else new_l_max[0]):
            for lr in LRS:
                res = run(path, l_max, lr, args.steps)
                rows.append({"case": name, "L_max": l_max, "lr": lr, "scale": lr / run_lr, **res})
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "ldelta_lr.json", json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
    lines = [
        "# L_δ learned by the regularizers alone: encoder learning rate × L_max (smoke settings)\n",
        (
            f"{args.steps} Adam steps on α·L_δ + β·L_OOD alone from each shipped SeqPE smoke config (space, encoder, "
            "α, β), probed on 4 × 64 fresh pivots. `scale` = encoder lr / the run's lr (`pe.encoder_lr_scale`); "
            "`train cos` = mean cosine between the embeddings of the training positions (1.0: one point). "
            "Produced by `benchmarks/ldelta_lr.py`.\n"
        ),
        "| case | L_max | encoder lr | scale | L_δ | chance | p⁺ top-1 | train cos |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['L_max']} | {r['lr']:.0e} | {r['scale']:.2f} | {r['l_delta']:.3f} | "
                     f"{r['chance']:.3f} | {r['top1']:.1%} | {r['train_cos']:.4f} |")
    atomic_write_text(RESULTS / "ldelta_lr.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS}/ldelta_lr.json and .md")


if __name__ == "__main__":
    main()

"""Each released-recipe difference of issue 21 undone alone: SeqPE on the smoke LM (seed 0 unless a case says).

Every case is ``seqpe-nd compare CONFIG --methods seqpe`` with its overrides (finished runs in ``--runs`` are
reused, interrupted ones resumed); the table puts each beside the shipped setting. One seed per case: read a
difference as real only beyond the 3-seed spread of ``lm_table1.md`` (SeqPE ± 3.7 at 128 tokens).
Writes ``benchmarks/results/seqpe_fidelity.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/seqpe_fidelity.py     # ~50 min on one CPU thread; reuses finished runs
"""

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from seqpe_nd.positions import load_space
from seqpe_nd.tasks.cli.compare import compare
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LM = ROOT / "configs/lm/smoke/default.yaml"
LLAMA = ROOT / "configs/lm/smoke/llama/default.yaml"
# name: (label, base config, overrides)
CASES: dict[str, tuple[str, Path, list[str]]] = {
    "shipped": ("shipped (released recipe, encoder capped at 3e-4)", LM, []),
    "kl_one_way": ("L_OOD one-directional (Eq. 10 as printed)", LM, ["pe.symmetric_kl=false"]),
    "no_w_pe_bias": ("W_PE without bias", LM, ["pe.w_pe_bias=false"]),
    "joint_clip": ("one global clip (no train.clip_grad_pe)", LM, ["train.clip_grad_pe=null"]),
    "one_start": ("one shift start per batch, no pool", LM, []),  # space override below
    "warmup30": ("30 warmup steps (before)", LM, ["train.warmup_steps=30"]),
    "w_pe_std0.05_seed1": ("W_PE init std 0.05 (≈ PyTorch's default), seed 1", LM, ["pe.w_pe_std=0.05", "train.seed=1"]),
    "w_pe_std0.05_seed2": ("W_PE init std 0.05 (≈ PyTorch's default), seed 2", LM, ["pe.w_pe_std=0.05", "train.seed=2"]),
    "llama_enc_2e-3": ("Llama, encoder at the run's 2e-3 (no cap)", LLAMA, ["pe.encoder_lr_max=null"]),
}


def one_start_config(runs: Path) -> Path:
    """The smoke config with the text space's shift at one start per batch and no pool (the recipe before)."""
    space = load_space(ROOT / "configs/lm/smoke/text-128.yaml").model_dump(mode="json")
    space.pop("k", None)
    space["shift"] = {**space["shift"], "starts": 1, "pool": None}
    path = runs / "one_start.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"extends": str(LM), "space": space}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/ablation")
    parser.add_argument("--shipped", type=Path, default=ROOT / "runs/bench-lm-table1",
                        help="lm_table1.py's run folders: the shipped SeqPE of seeds 0-2 is read from there")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    for name, (label, config, overrides) in CASES.items():
        if args.only is not None and name not in args.only:
            continue
        if name == "shipped":
            seeds = {}
            for s in (0, 1, 2):
                path = args.shipped / f"seed{s}" / "seqpe" / "eval.json"
                if path.is_file():
                    seeds[s] = {k: v["ppl"] for k, v in json.loads(path.read_text())["lengths"].items()}
            rows[name] = {"label": label, "by_seed": seeds}
            continue
        if name == "one_start":
            config = one_start_config(args.runs)
        res = compare(config, ["seqpe"], args.runs / name, overrides=overrides)
        seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.seed=")), 0)
        ppl = {k: v["ppl"] for k, v in res["seqpe"]["lengths"].items()}
        rows[name] = {"label": label, "overrides": overrides, "seed": seed, "ppl": ppl}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "seqpe_fidelity.json", json.dumps(rows, indent=1) + "\n")
    lines = ["# Each released-recipe difference undone alone (SeqPE, smoke LM, 1500 steps)\n",
             "Test perplexity at 128 → 2048 tokens; one seed per case, so a difference within the 3-seed spread of "
             "`lm_table1.md` (SeqPE ± 3.7 at 128) is noise. Produced by `benchmarks/seqpe_fidelity.py`.\n",
             "| case | seed | 128 | 256 | 512 | 1024 | 2048 | 2048 / 128 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        entries = r["by_seed"].items() if "by_seed" in r else [(r["seed"], r["ppl"])]
        for seed, ppl in entries:
            v = [ppl[k] for k in sorted(ppl, key=int)]
            lines.append(f"| {r['label']} | {seed} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {v[-1] / v[0]:.3f} |")
    atomic_write_text(args.results / "seqpe_fidelity.md", "\n".join(lines) + "\n")
    print(f"wrote {args.results}/seqpe_fidelity.json and .md")


if __name__ == "__main__":
    main()

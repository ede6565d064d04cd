"""RoPE context extension on a trained RoPE run: the LM Table 1 analogue's rows RoPE + PI, + NTK, + YaRN.

The extensions act in evaluation only, so they need no training of their own: the RoPE run of
``benchmarks/lm_table1.py`` (``runs/bench-lm-table1/rope``, base 10⁴, trained at 128 tokens) is
evaluated with §4.1's protocol at 1×…16× its training length, plain and with each
``pe.scaling`` (factor = evaluated length / training length, as a user would set it per length).
Plain RoPE and ALiBi from the same table are printed beside them.

    python benchmarks/rope_extension.py
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from seqpe_nd.encodings import load_pe_config
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.recipes.lm import LMRecipe, eval_settings, perplexity

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "RoPE": None,
    "RoPE + PI": {"type": "linear"},
    "RoPE + NTK": {"type": "ntk"},
    "RoPE + dynamic NTK": {"type": "dynamic"},
    "RoPE + YaRN": {"type": "yarn"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-lm-table1" / "rope")
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "bench-lm-table1" / "alibi")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = LMRecipe.from_run(args.run)
    lengths, split, max_tokens = eval_settings(recipe.cfg, recipe.cfg)
    tokens = recipe.corpus.split(split)
    model = recipe.load_trained()
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for name, scaling in VARIANTS.items():
        pe_cfg = load_pe_config({**recipe.cfg.pe.model_dump(), "scaling": scaling})
        model.pe.scaling = pe_cfg.scaling  # evaluation-only: the trained weights are untouched
        model.pe.original_length = recipe.cfg.model.block_size
        rows[name] = {str(n): perplexity(model, tokens, n, max_tokens=max_tokens)["ppl"] for n in lengths}
        print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    reference = json.loads((args.reference / "eval.json").read_text()) if (args.reference / "eval.json").is_file() else None
    if reference is not None:
        rows["ALiBi (trained run)"] = {k: v["ppl"] for k, v in reference["lengths"].items() if k in map(str, lengths)}
    result = {"run": str(args.run.relative_to(ROOT)), "split": split, "max_tokens": max_tokens, "block_size": recipe.cfg.model.block_size,
              "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(args.out / "rope_extension.json", json.dumps(result, indent=1) + "\n")
    header = "| method | " + " | ".join(str(n) for n in lengths) + " |"
    lines = [f"# RoPE context extension on the trained smoke RoPE run ({split} perplexity, trained at "
             f"{recipe.cfg.model.block_size} tokens; factor = length / {recipe.cfg.model.block_size})\n",
             header, "|" + "---|" * (len(lengths) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[str(n)]:.2f}" if str(n) in r else "-" for n in lengths) + " |")
    ckpt.atomic_write_text(args.out / "rope_extension.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Table 1 (and Table 4's α/β ablation) of the paper at smoke scale, on the embedded corpus.

Every method is trained from the same base config (``configs/lm/smoke/default.yaml``: a 2-layer,
128-wide GPT-2, 128-token blocks, same steps, data order and seed; only the ``pe`` section and the
random shift differ: the method files in ``configs/lm/smoke``) and evaluated with §4.1's protocol
at 1×, 2×, 4×, 8× and 16× the training length on the embedded test split. Results go to
``benchmarks/results/lm_table1.{json,md,png}``; the runs themselves to ``runs/bench-lm-table1/``
(rerunning reuses finished runs and resumes interrupted ones).

    python benchmarks/lm_table1.py --jobs 2              # ~45 min on a 2-core CPU (11 runs of 1500 steps)
    python benchmarks/lm_table1.py --set train.steps=50  # a quick look
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.cli.compare import TABLE1, TABLE4, compare
from seqpe_nd.tasks.recipes import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/lm/smoke/default.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/bench-lm-table1")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="methods trained at once, one process and one thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    methods = list(TABLE1) + [m for m in TABLE4 if m not in TABLE1]
    results = compare(args.config, methods, args.runs, overrides=args.overrides, jobs=args.jobs)
    wall = time.perf_counter() - t0

    from seqpe_nd.tasks.recipes import lm
    from seqpe_nd.tasks.engine.plots import plot_ppl

    base = load_config(args.config, args.overrides)
    rows = lm.LMRecipe.summarize(results)
    table1 = {m: rows[m] for m in TABLE1}
    table4 = {m: rows[m] for m in TABLE4}
    setup = {
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "overrides": args.overrides, "steps": base.train.steps, "batch_size": base.train.batch_size,
        "block_size": base.model.block_size, "train_tokens": base.train.steps * base.train.batch_size * base.model.block_size,
        "eval_max_tokens_per_length": base.eval.max_tokens, "split": base.eval.split,
        "torch_threads": args.threads, "jobs": args.jobs, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "wall_seconds": wall,
    }
    payload = {"setup": setup, "table1": table1, "table4": table4, "runs": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(RESULTS / "lm_table1.json", json.dumps(payload, indent=1) + "\n")
    md1 = lm.LMRecipe.print_summary(table1, "Table 1 (smoke): test perplexity vs evaluation length")
    md4 = lm.LMRecipe.print_summary(table4, "Table 4 (smoke): SeqPE with α (L_δ) and β (L_OOD) on/off")
    L = base.model.block_size
    text = (
        f"# Table 1 / Table 4 at smoke scale ({base.model.n_layer}-layer, {base.model.n_embd}-wide GPT-2, embedded corpus)\n\n"
        f"Trained {base.train.steps} steps × {base.train.batch_size} blocks of {L} tokens "
        f"({setup['train_tokens']:,} tokens) per method, same data order and seed; evaluated on the "
        f"{base.eval.split} split with §4.1's protocol (non-overlapping chunks from position 0, batch 1, "
        f"at most {base.eval.max_tokens} tokens per length). Columns are evaluation lengths "
        f"({', '.join(f'{x // L}×' for x in sorted(next(iter(rows.values()))['ppl']))} the training length); "
        f"`avg` is their mean; times in seconds, {args.jobs} run(s) at a time with one torch thread each on a {os.cpu_count()}-core CPU. "
        f"Whole benchmark: {wall / 60:.1f} min.\n\n"
        f"## Table 1\n\n{md1}\n## Table 4 (α weighs L_δ, β weighs L_OOD; `seqpe` is α = β = 0.1)\n\n{md4}"
    )
    ckpt.atomic_write_text(RESULTS / "lm_table1.md", text)
    plot_ppl({m: r["ppl"] for m, r in table1.items()}, RESULTS / "lm_table1.png",
             title=f"Table 1 at smoke scale: perplexity vs length (trained at {L})", train_length=L)
    plot_ppl({m: r["ppl"] for m, r in table4.items()}, RESULTS / "lm_table4.png",
             title=f"Table 4 at smoke scale: SeqPE regularizer ablation (trained at {L})", train_length=L)
    print(f"wrote {RESULTS}/lm_table1.json, .md, .png and lm_table4.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()

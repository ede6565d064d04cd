"""Table 1 (and Table 4's α/β ablation) of the paper at smoke scale, on the embedded corpus, over several seeds.

Every method is trained from the same base config (``configs/lm/smoke/default.yaml``: a 2-layer,
128-wide GPT-2, 128-token blocks, same steps and data order; only the ``pe`` section and the
random shift differ: the method files in ``configs/lm/smoke``) once per seed (``--set train.seed=S``),
and evaluated with §4.1's protocol at 1×, 2×, 4×, 8× and 16× the training length on the embedded
test split. Cells are the mean ± sample std (n - 1) over the seeds; the JSON keeps every seed's numbers.
Results go to ``<results>/<name>.{json,md,png}`` (and ``lm_table4.png`` for the ablation rows); the
runs themselves to ``<runs>/seed<S>/<method>`` (rerunning reuses finished runs and resumes interrupted
ones), seeds × methods on one pool of ``--jobs`` workers.

    python benchmarks/lm_table1.py --jobs 2                  # 3 seeds x 12 runs of 1500 steps: ~2.5 h on a 2-core CPU
    python benchmarks/lm_table1.py --config configs/lm/smoke/llama/default.yaml --name lm_llama_smoke \\
        --methods nope rope alibi seqpe --jobs 2              # the same on the tiny Llama
    python benchmarks/lm_table1.py --seeds 0 --set train.steps=50   # a quick look (one seed: no spread)
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from seqpe_nd.tasks.cli.compare import TABLE1, TABLE4, compare_seeds
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.recipes import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_METHODS = list(TABLE1) + [m for m in TABLE4 if m not in TABLE1]
ARCH = {"gpt2": "GPT-2", "llama": "Llama", "gpt2_stock": "GPT-2"}


def shown(path: Path) -> str:
    full = path.resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/lm/smoke/default.yaml")
    parser.add_argument("--name", default="lm_table1",
                        help="output stem: <results>/<name>.json, .md, .png (default lm_table1; for Llama: "
                             "lm_llama_smoke)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                        help=f"method files (default Table 1 and Table 4: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                        help="training seeds (train.seed) of every method (default 0 1 2); the table needs them all")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run folders, <runs>/seed<S>/<method> (default runs/bench-<name, '_' as '-'>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, Markdown and PNGs go")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process and one thread each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_dir = args.runs or ROOT / "runs" / f"bench-{args.name.replace('_', '-')}"
    methods = list(dict.fromkeys(args.methods))

    t0 = time.perf_counter()
    results = compare_seeds(args.config, methods, args.seeds, runs_dir, overrides=args.overrides, jobs=args.jobs)
    wall = time.perf_counter() - t0

    from seqpe_nd.tasks.engine.plots import plot_ppl
    from seqpe_nd.tasks.recipes import lm

    base = load_config(args.config, args.overrides)
    rows = lm.LMRecipe.summarize_seeds(results)
    ablation = [m for m in methods if m in TABLE4]
    table4_names = ablation if any(m not in TABLE1 for m in ablation) else []
    table1 = {m: rows[m] for m in methods if m not in TABLE4 or m in TABLE1}
    table4 = {m: rows[m] for m in table4_names}
    L = base.model.block_size
    seeds = ", ".join(map(str, args.seeds))
    setup = {
        "config": shown(args.config), "overrides": args.overrides, "methods": methods, "seeds": args.seeds,
        "runs": shown(runs_dir), "steps": base.train.steps, "batch_size": base.train.batch_size, "block_size": L,
        "train_tokens": base.train.steps * base.train.batch_size * L,
        "eval_max_tokens_per_length": base.eval.max_tokens, "split": base.eval.split,
        "torch_threads": args.threads, "jobs": args.jobs, "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "wall_seconds": wall,
    }
    payload: dict[str, Any] = {
        "setup": setup, "table1": table1, "table4": table4,
        "runs": {str(seed): by_method for seed, by_method in results.items()},
    }
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / f"{args.name}.json", json.dumps(payload, indent=1) + "\n")

    spread = f"mean ± std over seeds {seeds}" if len(args.seeds) > 1 else f"seed {seeds}"
    md1 = lm.LMRecipe.print_summary(table1, f"Table 1 (smoke): test perplexity vs evaluation length, {spread}",
                                    reference=str(L))
    m = base.model
    arch = ARCH[m.arch] + (f" ({m.kv_heads} key/value heads)" if m.kv_heads else "")
    lengths = sorted(int(x) for x in next(iter(rows.values()))["ppl"])
    text = (
        f"# Table 1{' / Table 4' if table4 else ''} at smoke scale ({m.n_layer}-layer, {m.n_embd}-wide {arch}, "
        f"embedded corpus; `{setup['config']}`)\n\n"
        f"Trained {base.train.steps} steps × {base.train.batch_size} blocks of {L} tokens "
        f"({setup['train_tokens']:,} tokens) per method and seed, the same data order for every method; seeds "
        f"(`train.seed`) {seeds}, one run each. Evaluated on the {base.eval.split} split with §4.1's protocol "
        f"(non-overlapping chunks from position 0, batch 1, at most {base.eval.max_tokens} tokens per length). "
        f"Columns are evaluation lengths ({', '.join(f'{x // L:g}×' for x in lengths)} the training length); "
        f"cells are the {spread} (sample std, n - 1); `avg` is the mean over lengths (its spread over seeds); "
        f"`std % at {L}` is the std at the training length as a percentage of the mean. Times in seconds (mean "
        f"over seeds), {args.jobs} run(s) at a time with one torch thread each on a {os.cpu_count()}-core CPU. "
        f"Whole benchmark: {wall / 60:.1f} min. Every seed's numbers are in `{args.name}.json`.\n\n"
        f"## Table 1\n\n{md1}"
    )
    if table4:
        title4 = f"Table 4 (smoke): SeqPE with α (L_δ) and β (L_OOD) on/off, {spread}"
        md4 = lm.LMRecipe.print_summary(table4, title4, reference=str(L))
        text += f"\n## Table 4 (α weighs L_δ, β weighs L_OOD; `seqpe` is α = β = 0.1)\n\n{md4}"
    ckpt.atomic_write_text(out / f"{args.name}.md", text)

    def plot(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
        plot_ppl({k: {int(x): v for x, v in r["ppl"].items()} for k, r in table.items()}, path, title=title,
                 train_length=L, std={k: {int(x): v for x, v in r["std"].items()} for k, r in table.items()})

    plot(table1, out / f"{args.name}.png", f"Table 1 at smoke scale ({arch}): perplexity vs length (trained at {L})"
         f"\n{spread}")
    written = [f"{args.name}.json", ".md", ".png"]
    if table4:
        stem4 = args.name.replace("table1", "table4") if "table1" in args.name else f"{args.name}_table4"
        plot(table4, out / f"{stem4}.png",
             f"Table 4 at smoke scale: SeqPE regularizer ablation (trained at {L})\n{spread}")
        written.append(f"{stem4}.png")
    print(f"wrote {out}/{', '.join(written)} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()

"""``seqpe-nd compare CONFIG --methods nope ape_sin ... [--out DIR]``: Table 1 on your own config.

Trains one run per method preset (the preset sets the ``pe`` section of CONFIG, see
:data:`seqpe_nd.tasks.recipes.lm.METHOD_PRESETS`), same steps and seed, evaluates each, and prints one
table; ``DIR/compare.json``, ``compare.md`` and ``compare.png`` hold the results. Finished runs
are reused, interrupted ones resumed, so rerunning the command continues where it stopped.
``--jobs N`` trains N methods at once, each in its own process on one CPU thread (tiny models
train fastest that way on a small CPU); evaluation follows in the main process.
"""

import argparse
import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.recipes import load_config, train_config

TABLE1 = ("nope", "ape_sin", "ape_learn", "rope", "rope-1e6", "rope-1e8", "alibi", "seqpe")
TABLE4 = ("seqpe-a0-b0", "seqpe-a0.1-b0", "seqpe-a0-b0.1", "seqpe")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("compare", help="train and evaluate several position encodings from one LM config")
    p.add_argument("config", type=Path, help="base LM run config (YAML)")
    p.add_argument("--methods", nargs="+", default=list(TABLE1), metavar="METHOD",
                   help=f"method presets (default: Table 1's {' '.join(TABLE1)}; Table 4's ablation: {' '.join(TABLE4[:3])})")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/compare-<config-stem>)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="evaluation lengths (default: the config's eval.lengths)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first chunks covering this many tokens per length")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base config for every method, e.g. --set train.steps=100")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N methods at once, one process and one CPU thread each (default 1: one after another)")
    p.set_defaults(func=run_compare)


def _train_seconds(config: dict[str, Any], run_dir: Path, threads: int | None) -> float:
    """Train (or reuse) one method's run; returns its training wall time (a finished run keeps its own)."""
    import torch
    from seqpe_nd.tasks.recipes import lm
    from seqpe_nd.tasks.engine.trainer import train_or_reuse

    if threads is not None:
        torch.set_num_threads(threads)
    return train_or_reuse(lambda: lm.build_task(config, run_dir), train_config(config), run_dir, config=config)


def compare(
    config_path: Path,
    methods: Sequence[str],
    out: Path,
    *,
    overrides: Sequence[str] = (),
    lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train (or reuse) and evaluate one run per method preset; write and return the comparison."""
    from seqpe_nd.tasks.recipes import lm  # heavy (transformers): imported when a comparison runs, not for --help

    if jobs < 1:
        raise ValueError(f"--jobs {jobs} is not allowed; it must be a positive integer")
    base = load_config(config_path, overrides)
    if base["task"] != "lm":
        raise ValueError(f"{config_path}: compare needs an LM config (task: lm), got task {base['task']!r}")
    configs = {name: lm.apply_preset(base, name) for name in methods}  # unknown names fail before any training
    out.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        seconds = {name: _train_seconds(config, out / name, None) for name, config in configs.items()}
    else:  # spawn: a forked torch process can deadlock in its thread pool
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_train_seconds, config, out / name, 1) for name, config in configs.items()}
            seconds = {name: future.result() for name, future in futures.items()}
    results: dict[str, dict[str, Any]] = {}
    for name in configs:
        res = lm.evaluate(out / name, lengths=lengths, max_tokens=max_tokens, quiet=True, reuse=True)
        results[name] = {**res, "train_seconds": seconds[name], "eval_seconds": res["seconds"]}
    write_comparison(results, out, title=f"{config_path}: perplexity vs evaluation length")
    return results


def write_comparison(results: dict[str, dict[str, Any]], out: Path | None, *, title: str) -> dict[str, Any]:
    """Print one table; with ``out``, write compare.json, compare.md and compare.png there (atomically)."""
    from seqpe_nd.tasks.recipes import lm
    from seqpe_nd.tasks.engine.plots import plot_ppl

    rows = lm.summarize(results)
    md = lm.print_summary(rows, title)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        blocks = {r["block_size"] for r in results.values()}
        payload = {"title": title, "rows": rows, "runs": results}
        ckpt.atomic_write_text(out / "compare.json", json.dumps(payload, indent=1) + "\n")
        ckpt.atomic_write_text(out / "compare.md", f"## {title}\n\n{md}")
        plot_ppl({k: r["ppl"] for k, r in rows.items()}, out / "compare.png", title=title,
                 train_length=blocks.pop() if len(blocks) == 1 else None)
    return rows


def run_compare(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"compare-{args.config.stem}"
    compare(args.config, args.methods, out, overrides=args.overrides, lengths=args.lengths, max_tokens=args.max_tokens,
            jobs=args.jobs)
    print(f"results in {out}/compare.json, compare.md, compare.png")
    return 0

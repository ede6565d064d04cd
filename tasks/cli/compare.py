"""``seqpe-nd compare CONFIG --methods nope ape_sin ... [--out DIR]``: Table 1 on your own config.

A method is a YAML file that states only what makes the method (its ``pe:`` section, and
``random_shift: false`` for the APE baselines): ``NAME`` is ``NAME.yaml`` next to CONFIG, else
the shipped ``configs/lm/smoke/NAME.yaml``, else a path. Those files are also complete run
configs (``extends: default.yaml`` plus the method), so ``seqpe-nd train configs/lm/smoke/rope.yaml``
trains exactly the run ``compare`` trains for ``rope``: the presets live in one place.

One run per method, same steps and seed, each evaluated, one table printed;
``DIR/compare.json``, ``compare.md`` and ``compare.png`` hold the results. Finished runs are
reused, interrupted ones resumed, so rerunning the command continues where it stopped.
``--jobs N`` trains N methods at once, each in its own process on one CPU thread (tiny models
train fastest that way on a small CPU); evaluation follows in the main process.
"""

import argparse
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.recipes.config import (
    SHIPPED_ROOT,
    apply_override,
    load_yaml,
    merge_sections,
    parse_run_config,
    read_yaml,
)

TABLE1 = ("nope", "ape_sin", "ape_learn", "rope", "rope-1e6", "rope-1e8", "alibi", "seqpe")
TABLE4 = ("seqpe-a0-b0", "seqpe-a0.1-b0", "seqpe-a0-b0.1", "seqpe")
METHODS_DIR = Path("configs/lm/smoke")
"""Where method names not found next to the base config are looked up (under the shipped configs)."""


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("compare", help="train and evaluate several position encodings from one LM config")
    p.add_argument("config", type=Path, help="base LM run config (YAML)")
    p.add_argument("--methods", nargs="+", default=list(TABLE1), metavar="METHOD",
                   help=f"method YAML files by name or path (default: Table 1's {' '.join(TABLE1)}; "
                        f"Table 4's ablation: {' '.join(TABLE4[:3])})")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/compare-<config-stem>)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="evaluation lengths (default: the config's eval.lengths)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first chunks covering this many tokens per length")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base config for every method, e.g. --set train.steps=100")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N methods at once, one process and one CPU thread each (default 1: one after another)")
    p.set_defaults(func=run_compare)


def method_file(name: str, config_dir: Path) -> Path:
    """The YAML file of method ``name``: beside the base config, in the shipped smoke configs, or a path."""
    for candidate in (config_dir / f"{name}.yaml", SHIPPED_ROOT / METHODS_DIR / f"{name}.yaml", Path(name)):
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in (config_dir, SHIPPED_ROOT / METHODS_DIR) for p in d.glob("*.yaml")})
    raise ValueError(f"unknown method {name!r}: no {name}.yaml in {config_dir} or {METHODS_DIR}; allowed: {', '.join(known)}")


def method_config(base: dict[str, Any], name: str, config_dir: Path) -> dict[str, Any]:
    """``base`` with method ``name``'s own sections (its file as written, without ``extends:``) on top."""
    own = {k: v for k, v in read_yaml(method_file(name, config_dir)).items() if k not in ("extends", "task")}
    return merge_sections(base, own)


def _train_seconds(config: Any, run_dir: Path, threads: int | None) -> float:
    """Train (or reuse) one method's run; returns its training wall time (a finished run keeps its own)."""
    import torch

    from seqpe_nd.tasks.engine.trainer import train_or_reuse
    from seqpe_nd.tasks.recipes.lm import LMRecipe

    if threads is not None:
        torch.set_num_threads(threads)
    return train_or_reuse(lambda: LMRecipe.build_task(config, run_dir), config.train, run_dir,
                          config=config.model_dump(mode="json"))


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
    """Train (or reuse) and evaluate one run per method; write and return the comparison."""
    from seqpe_nd.tasks.recipes.lm import LMRecipe, eval_settings  # heavy (transformers): when a comparison runs

    if jobs < 1:
        raise ValueError(f"--jobs {jobs} is not allowed; it must be a positive integer")
    config_path = Path(config_path)
    config_dir = config_path.resolve().parent
    base = load_yaml(config_path)
    for item in overrides:
        apply_override(base, item)
    if base.get("task") != "lm":
        raise ValueError(f"{config_path}: compare needs an LM config (task: lm), got task {base.get('task')!r}")
    configs = {  # every method validated before any training
        name: parse_run_config(method_config(base, name, config_dir), config_dir=config_dir, source=f"{config_path} + {name}")
        for name in methods
    }
    for config in configs.values():  # and the evaluation options, which otherwise fail only after training
        eval_settings(config, lengths=list(lengths) if lengths else None, max_tokens=max_tokens)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the runs and the comparison")
    out.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        seconds = {name: _train_seconds(config, out / name, None) for name, config in configs.items()}
    else:  # spawn: a forked torch process can deadlock in its thread pool
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(_train_seconds, config, out / name, 1) for name, config in configs.items()}
            seconds = {name: future.result() for name, future in futures.items()}
    results: dict[str, dict[str, Any]] = {}
    for name in configs:
        res = LMRecipe.evaluate(out / name, lengths=lengths, max_tokens=max_tokens, quiet=True, reuse=True)
        results[name] = {**res, "train_seconds": seconds[name], "eval_seconds": res["seconds"]}
    LMRecipe.write_comparison(results, out, title=f"{config_path}: perplexity vs evaluation length")
    return results


def run_compare(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"compare-{args.config.stem}"
    compare(args.config, args.methods, out, overrides=args.overrides, lengths=args.lengths, max_tokens=args.max_tokens,
            jobs=args.jobs)
    print(f"results in {out}/compare.json, compare.md, compare.png")
    return 0

"""``seqpe-nd compare CONFIG --methods nope ape_sin ... [--out DIR]``: Table 1 on your own config.

A method is a YAML file that states only what makes the method (its ``pe:`` section, and
``random_shift: false`` for the APE baselines): ``NAME`` is ``NAME.yaml`` next to CONFIG, else
the shipped ``configs/lm/smoke/NAME.yaml``, else a path. Those files are also complete run
configs (``extends: default.yaml`` plus the method), so ``seqpe-nd train configs/lm/smoke/rope.yaml``
trains exactly the run ``compare`` trains for ``rope``: the presets live in one place.

One run per method, same steps and seed, each evaluated, one table printed;
``DIR/compare.json``, ``compare.md`` and ``compare.png`` hold the results. Finished runs are
reused, interrupted ones resumed, so rerunning the command continues where it stopped.
``--jobs N`` trains and evaluates N methods at once, each in its own process on one CPU thread
(tiny models train fastest that way on a small CPU).

:func:`compare_seeds` is the same with several training seeds (``train.seed``): one run folder per
seed and method (``OUT/seed<S>/<method>``), all of them scheduled on one pool of workers.
"""

import argparse
import copy
import multiprocessing
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.recipes.config import (
    SHIPPED_ROOT,
    apply_override,
    find_config_file,
    load_yaml,
    merge_sections,
    parse_run_config,
    read_yaml,
)

TABLE1 = ("nope", "ape_sin", "ape_learn", "gpt2_stock", "rope", "rope-1e6", "rope-1e8", "alibi", "seqpe")
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


def _train_and_evaluate(
    config: Any, run_dir: Path, label: str, threads: int | None, lengths: Sequence[int] | None, max_tokens: int | None
) -> dict[str, Any]:
    """Train (or reuse, or resume) one run and evaluate it (reusing a matching ``eval.json``); in a worker or in process."""
    import torch

    from seqpe_nd.tasks.engine.trainer import train_or_reuse
    from seqpe_nd.tasks.recipes.lm import LMRecipe

    if threads is not None:
        torch.set_num_threads(threads)
    print(f"start {label}: {run_dir}", flush=True)
    seconds = train_or_reuse(lambda: LMRecipe.build_task(config, run_dir), config.train, run_dir,
                             config=config.model_dump(mode="json"))
    res = LMRecipe.evaluate(run_dir, lengths=lengths, max_tokens=max_tokens, quiet=True, reuse=True)
    return {**res, "train_seconds": seconds, "eval_seconds": res["seconds"]}


def _run_all(
    runs: Mapping[Hashable, tuple[Any, Path, str]], *, lengths: Sequence[int] | None, max_tokens: int | None, jobs: int
) -> dict[Hashable, dict[str, Any]]:
    """Train and evaluate every ``key: (config, run_dir, label)``, ``jobs`` at a time; results in the order of ``runs``.

    Every run is attempted; those that failed are named together at the end (the others stay finished and are
    reused by the next call), so a table is never written from fewer runs than asked for.
    """
    lengths = list(lengths) if lengths else None
    t0 = time.perf_counter()
    done: dict[Hashable, dict[str, Any]] = {}
    failed: dict[Hashable, BaseException] = {}

    def finished(key: Hashable, result: dict[str, Any]) -> None:
        done[key] = result
        print(f"[{time.perf_counter() - t0:6.0f}s] done {runs[key][2]} ({len(done)}/{len(runs)}): "
              f"train {result['train_seconds']:.0f}s, eval {result['eval_seconds']:.0f}s", flush=True)

    if jobs == 1:
        for key, (config, run_dir, label) in runs.items():
            try:
                finished(key, _train_and_evaluate(config, run_dir, label, None, lengths, max_tokens))
            except Exception as err:  # noqa: BLE001 - reported with the others below
                failed[key] = err
                print(f"failed {label}: {err!r}", flush=True)
    else:  # spawn: a forked torch process can deadlock in its thread pool
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures: dict[Future[dict[str, Any]], Hashable] = {
                pool.submit(_train_and_evaluate, config, run_dir, label, 1, lengths, max_tokens): key
                for key, (config, run_dir, label) in runs.items()
            }
            for future in as_completed(futures):
                key = futures[future]
                if (err := future.exception()) is not None:
                    failed[key] = err
                    print(f"failed {runs[key][2]}: {err!r}", flush=True)
                else:
                    finished(key, future.result())
    if failed:
        names = "; ".join(f"{runs[k][2]} ({runs[k][1]}): {e!r}" for k, e in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed, so no table was written: {names}") \
            from next(iter(failed.values()))
    return {key: done[key] for key in runs}


def method_configs(
    config_path: Path, methods: Sequence[str], *, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None, max_tokens: int | None = None,
) -> dict[tuple[int | None, str], Any]:
    """Every (seed, method)'s validated run config (seed None: the base config's own), each checked before any
    training, the evaluation options too (which would otherwise fail only after training)."""
    from seqpe_nd.tasks.recipes.lm import eval_settings  # heavy (transformers): when a comparison runs

    config_path = find_config_file(config_path, what="config")  # the path, else the shipped configs
    config_dir = config_path.resolve().parent
    base = load_yaml(config_path)
    for item in overrides:
        apply_override(base, item)
    if base.get("task") != "lm":
        raise ValueError(f"{config_path}: compare needs an LM config (task: lm), got task {base.get('task')!r}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"seeds {list(seeds)} not allowed: give one or more distinct integers")
    configs: dict[tuple[int | None, str], Any] = {}
    for seed in [None] if seeds is None else seeds:
        seeded = copy.deepcopy(base)
        if seed is not None:
            apply_override(seeded, f"train.seed={seed}")
        for name in methods:
            source = f"{config_path} + {name}" + ("" if seed is None else f" (seed {seed})")
            configs[seed, name] = parse_run_config(method_config(seeded, name, config_dir), config_dir=config_dir,
                                                   source=source)
    for config in configs.values():
        eval_settings(config.with_eval(lengths=list(lengths) if lengths else None, max_tokens=max_tokens), config)
    return configs


def _check_out(out: Path, jobs: int) -> None:
    if jobs < 1:
        raise ValueError(f"--jobs {jobs} is not allowed; it must be a positive integer")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the runs and the comparison")


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
    """Train (or reuse) and evaluate one run per method in ``out/<method>``; write and return the comparison."""
    from seqpe_nd.tasks.recipes.lm import LMRecipe

    _check_out(out, jobs)
    configs = method_configs(config_path, methods, overrides=overrides, lengths=lengths, max_tokens=max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: (config, out / name, name) for (_, name), config in configs.items()}
    results = _run_all(runs, lengths=lengths, max_tokens=max_tokens, jobs=jobs)
    LMRecipe.write_comparison(results, out, title=f"{config_path}: perplexity vs evaluation length")
    return results  # type: ignore[return-value]


def seed_dir(out: Path, seed: int) -> Path:
    """The folder of one seed's runs (``out/seed<S>``)."""
    return Path(out) / f"seed{seed}"


def compare_seeds(
    config_path: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    overrides: Sequence[str] = (),
    lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
    jobs: int = 1,
) -> dict[int, dict[str, Any]]:
    """Train (or reuse) and evaluate one run per seed and method in ``out/seed<S>/<method>`` (``--set train.seed=S``
    on top of ``overrides``), seeds × methods on one pool of ``jobs`` workers; returns ``{seed: {method: result}}``.

    Nothing is written besides the runs: aggregate with ``LMRecipe.summarize_seeds``.
    """
    _check_out(out, jobs)
    configs = method_configs(config_path, methods, overrides=overrides, seeds=seeds, lengths=lengths,
                             max_tokens=max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    runs = {(seed, name): (config, seed_dir(out, seed) / name, f"{name} seed {seed}")
            for (seed, name), config in configs.items()}
    results = _run_all(runs, lengths=lengths, max_tokens=max_tokens, jobs=jobs)
    return {seed: {name: results[seed, name] for name in methods} for seed in seeds}


def run_compare(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"compare-{args.config.stem}"
    compare(args.config, args.methods, out, overrides=args.overrides, lengths=args.lengths, max_tokens=args.max_tokens,
            jobs=args.jobs)
    print(f"results in {out}/compare.json, compare.md, compare.png")
    return 0

"""``seqpe-nd eval RUN_DIR [RUN_DIR ...] [--lengths 128 256 ...]``: evaluate trained runs.

Dispatches on the ``task`` saved in each run's ``config.json`` (see :mod:`seqpe_nd.tasks.recipes`).
For the LM recipe this is the length-extrapolation protocol of §4.1; with several runs it also
prints one comparison table and writes ``--out``'s JSON and PNG.
"""

import argparse
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.engine.evaluation import read_run_config
from seqpe_nd.tasks.recipes import get_recipe


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("eval", help="evaluate trained runs (LM: perplexity at longer contexts)")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="training run directories")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="evaluation lengths in tokens (default: the run's eval.lengths, else 1-16x the training length)")
    p.add_argument("--split", default=None, choices=["train", "validation", "test"], help="split to evaluate (default: the run's eval.split)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first chunks covering this many tokens per length")
    p.add_argument(
        "--resolutions", nargs="+", type=int, default=None,
        help="ViT: evaluation resolutions in pixels (default: the run's eval.resolutions, else Table 3's 224…672 "
        "scaled to the training resolution)",
    )
    p.add_argument(
        "--max-images", type=int, default=None,
        help="ViT: evaluate only the first this many validation images per resolution",
    )
    p.add_argument(
        "--sizes", nargs="+", type=pair, default=None, metavar="AxP",
        help="video: FRAMESxPIXELS, hybrid: IMAGESxPIXELS pairs, e.g. 8x32 4x64 (default: the run's eval.sizes)",
    )
    p.add_argument("--max-clips", type=int, default=None, help="video: evaluate only the first this many clips")
    p.add_argument("--max-examples", type=int, default=None, help="hybrid: evaluate only the first this many examples")
    p.add_argument("--num-examples", type=int, default=None, help="QA: questions per length (default: eval.num_examples)")
    p.add_argument("--checkpoint", default=None, choices=["best", "latest"], help="QA: which weights (default: eval.checkpoint)")
    p.add_argument("--batch-size", type=int, default=None, help="ViT, video, hybrid: inputs per evaluation forward")
    p.add_argument(
        "--option", dest="extra", action="append", default=[], metavar="KEY=VALUE",
        help="any option of the run's recipe's evaluate(), as a YAML value, e.g. --option max_examples=64 "
        "--option sizes=[[4,32],[8,64]] (repeatable; a recipe's own flags above are shorthands for some of them)",
    )
    p.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="eval.KEY=VALUE",
        help="the same as --option KEY=VALUE, spelt as the run config's eval section (e.g. --set eval.max_images=64)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: CUDA when available)")
    p.add_argument("--out", type=Path, default=None, help="with several runs: write the comparison here (DIR/compare.json, compare.png)")
    p.set_defaults(func=run_eval)


def pair(text: str) -> tuple[int, int]:
    """``8x32`` -> (8, 32)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not AxP, e.g. 8x32")
    return int(parts[0]), int(parts[1])


OPTIONS = ("lengths", "split", "max_tokens", "resolutions", "max_images", "sizes", "max_clips", "max_examples",
           "num_examples", "checkpoint", "batch_size")
"""CLI flags handed to the recipe's evaluate(); each recipe refuses the ones it has no use for."""


def task_of(run_dir: Path) -> str:
    task = read_run_config(run_dir).get("task")
    if not task:
        raise ValueError(f"{run_dir}/config.json has no 'task' field")
    return str(task)


def extra_options(items: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items as keyword arguments of ``evaluate`` (values parsed as YAML)."""
    from seqpe_nd.tasks.recipes.config import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option {item!r} is not KEY=VALUE, e.g. --option max_examples=64")
        if key in flags or key in out:
            raise ValueError(f"--option {key} is given twice (once as --{key.replace('_', '-')} or --option)")
        out[key] = parse_value(text)
    return out


def run_eval(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    settings = []
    for item in args.settings:
        if not item.startswith("eval."):
            raise ValueError(f"--set {item!r}: eval takes the run config's eval settings only, e.g. --set eval.max_images=64")
        settings.append(item.removeprefix("eval."))
    options.update(extra_options([*args.extra, *settings], options))
    tasks = {task_of(r) for r in args.run_dirs}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks {sorted(tasks)} cannot be compared; evaluate them one task at a time")
    recipe = get_recipe(tasks.pop())
    results = {run_dir.name: recipe.evaluate(run_dir, device=args.device, **options) for run_dir in args.run_dirs}
    if len(results) > 1:
        recipe.write_comparison(results, args.out, title=f"{recipe.metric[1]} vs evaluation size")
        if args.out is not None:
            print("wrote " + ", ".join(str(args.out / name) for name in ("compare.json", "compare.md", "compare.png")))
    return 0

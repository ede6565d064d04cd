"""``seqpe-nd train CONFIG.yaml [--run-dir DIR] [--resume] [--set dotted.key=value ...]``.

Runs unchanged under ``torchrun --nproc-per-node N -m seqpe_nd.tasks.cli train ...`` (DDP).
"""

import argparse
import os
import time
from pathlib import Path

from seqpe_nd.tasks.recipes import get_recipe, load_config
from seqpe_nd.tasks.engine.checkpoint import latest_checkpoint
from seqpe_nd.tasks.engine.trainer import run_dir_has_content, train


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("train", help="train a recipe from a YAML run config")
    p.add_argument("config", type=Path, help="YAML run config (top-level 'task:' and 'train:'); a relative path not "
                   "found here is looked up in the configs shipped with the package")
    p.add_argument(
        "--run-dir", type=Path, default=None, help="output directory (default runs/<config-stem>-<timestamp>)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field with a YAML value, e.g. --set train.steps=10 --set pe.alpha=0 (repeatable)",
    )
    p.set_defaults(func=run_train)


def default_run_dir(config: Path) -> Path:
    return Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.run_dir is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each rank would pick its own timestamp: make the user name the one directory they share.
            raise ValueError("under torchrun pass --run-dir so that all ranks write to the same run")
        if args.resume:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        run_dir = default_run_dir(args.config)
    else:
        run_dir = args.run_dir
    if not args.resume and run_dir_has_content(run_dir):
        raise ValueError(
            f"run directory {run_dir} is not empty; pass --resume to continue it or choose another --run-dir"
        )

    task = get_recipe(config.task).build_task(config, run_dir)
    result = train(task, config.train, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "step")
        print(f"{run_dir}: step {int(result['step'])}" + (f", {shown}" if shown else ""))
        print(f"run directory: {run_dir}")
        print(f"checkpoint: {latest_checkpoint(run_dir)}")
        print(f"next: seqpe-nd eval {run_dir}")
    return 0

"""3-D video and interleaved text + image at smoke scale: every method, larger inputs, over seeds.

Trains every ``configs/video/smoke/*.yaml`` and/or ``configs/hybrid/smoke/*.yaml`` once per seed
(``--set train.seed=S``; one thread per run, ``--lanes`` runs at a time) with the shared training
loop, evaluates each at its config's ``eval.sizes`` (video: more frames and larger frames; hybrid:
more images and larger images), and writes ``benchmarks/results/{video,hybrid}_bench.{json,md,png}``
atomically: top-1 mean ± std over seeds with a chance row, error bars in the plots, and the
wall-clock training and evaluation seconds. Runs live in ``runs/bench-video-hybrid/<recipe>/seed<S>/
<name>``; a rerun reuses finished ones, so an interrupted benchmark resumes. Hybrid rows are top-1 over the
configs' 1024 validation examples (issue 22: each image read out after its patches, so which
image a readout belongs to is decidable from positions; see ``seqpe_nd.tasks.data.interleaved``).

    OMP_NUM_THREADS=1 python benchmarks/video_hybrid_bench.py --lanes 2                # both, seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/video_hybrid_bench.py --recipes hybrid --seeds 0 --only nope rope_flat
"""

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text
from seqpe_nd.tasks.engine.evaluation import mean_std
from seqpe_nd.tasks.engine.trainer import train_or_reuse
from seqpe_nd.tasks.recipes import get_recipe, load_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ORDER = {
    "video": ("nope", "ape_sin", "ape_learn", "rope_axial", "seqpe"),
    "hybrid": ("nope", "ape_sin_flat", "ape_learn_flat", "rope_flat", "mrope", "alibi_nd", "seqpe"),
}
LABELS = {
    "nope": "NoPE",
    "ape_sin": "APE-sin 3-D",
    "ape_learn": "APE-learn 3-D (trilinear)",
    "rope_axial": "RoPE axial 3-D",
    "seqpe": "SeqPE",
    "ape_sin_flat": "APE-sin (flat 1-D)",
    "ape_learn_flat": "APE-learn (flat 1-D)",
    "rope_flat": "RoPE (flat 1-D)",
    "mrope": "M-RoPE (Qwen2-VL)",
    "alibi_nd": "ALiBi-ND (hybrid metric)",
}
AXES = {"video": ("frames", "pixels"), "hybrid": ("images", "pixels")}


def run_one(recipe: str, name: str, seed: int, runs: str, overrides: list[str]) -> dict[str, Any]:
    """Train and evaluate one smoke config at one seed (in a worker process with one thread)."""
    torch.set_num_threads(1)
    cls = get_recipe(recipe)
    config = load_config(REPO / "configs" / recipe / "smoke" / f"{name}.yaml", [*overrides, f"train.seed={seed}"])
    run_dir = Path(runs) / recipe / f"seed{seed}" / name
    train_s = train_or_reuse(
        lambda: cls.build_task(config, run_dir), config.train, run_dir, config=config.model_dump(mode="json")
    )
    t1 = time.perf_counter()
    result = cls.evaluate(run_dir, quiet=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in lines if x["split"] == "train"][-1]
    return {
        "name": name,
        "seed": seed,
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
        "eval": result,
        "final_train_loss": final["loss"],
        "run_dir": str(run_dir),
    }


def size_label(recipe: str, row: dict[str, Any], train: list[int]) -> str:
    a, b = AXES[recipe]
    mark = " (train)" if [row[a], row[b]] == train else ""
    return f"{row[a]} {a} × {row[b]} px{mark}"


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-1 mean ± std over seeds at every size, and mean run times."""
    keys = list(per_seed[0]["eval"]["sizes"])
    top1 = {k: mean_std([r["eval"]["sizes"][k]["top1"] for r in per_seed]) for k in keys}
    return {
        "top1": {k: v[0] for k, v in top1.items()}, "std": {k: v[1] or 0.0 for k, v in top1.items()},  # one seed: 0
        "train_seconds": statistics.fmean(r["train_seconds"] for r in per_seed),
        "eval_seconds": statistics.fmean(r["eval_seconds"] for r in per_seed),
        "seeds": [r["seed"] for r in per_seed],
    }


def markdown(recipe: str, first: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    keys = list(first["sizes"])
    train = first["train_size"]
    chance = {k: first["sizes"][k].get("chance", 25.0) for k in keys}
    beyond_keys = [k for k in keys if [first["sizes"][k][AXES[recipe][0]], first["sizes"][k]["pixels"]] != train]
    head = ["method", *(size_label(recipe, first["sizes"][k], train) for k in keys),
            "avg beyond train", "std % at train", "train s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| chance | " + " | ".join(f"{chance[k]:.1f}" for k in keys) + " | | | | |")
    at_train = next(k for k in keys if k not in beyond_keys)
    for n, r in rows.items():
        cells = [LABELS.get(n, n), *(f"{r['top1'][k]:.1f} ± {r['std'][k]:.1f}" for k in keys)]
        beyond = [r["top1"][k] for k in beyond_keys]
        spread = 100.0 * r["std"][at_train] / max(r["top1"][at_train], 1e-9)
        cells += [f"{sum(beyond) / max(len(beyond), 1):.1f}", f"{spread:.1f}",
                  f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(recipe: str, first: dict[str, Any], rows: dict[str, dict[str, Any]], path: Path, spread: str) -> None:
    """Accuracy against the grown axis: left panel more frames/images, right panel larger frames/images."""
    from seqpe_nd.tasks.engine.plots import save_figure  # first: it selects the Agg backend

    import matplotlib.pyplot as plt

    a, b = AXES[recipe]
    ta, tb = first["train_size"]
    sizes = first["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, (grow, fixed, fixed_val, label) in zip(
        axes, ((a, b, tb, f"{a} (at {tb} px)"), (b, a, ta, f"pixels (with {ta} {a})"))
    ):
        keys = sorted((k for k, r in sizes.items() if r[fixed] == fixed_val), key=lambda k: sizes[k][grow])
        xs = [sizes[k][grow] for k in keys]
        for n, r in rows.items():
            ax.errorbar(xs, [r["top1"][k] for k in keys], yerr=[r["std"][k] for k in keys], marker="o", capsize=3,
                        label=LABELS.get(n, n))
        ax.plot(xs, [sizes[k].get("chance", 25.0) for k in keys], color="grey", linestyle="--", linewidth=1,
                label="chance")
        ax.axvline(ta if grow == a else tb, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{recipe}: accuracy beyond the training size (dotted line), {spread}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


TITLES = {
    "video": "Video (3-D): trained at 4 frames × 24 px",
    "hybrid": 'Interleaved text + image: trained with a reference and 2 candidate images of 24 px ("images" = candidates)\n\n'
    "Top-1: the highest-scoring candidate is the match. Each candidate is read out at its own `[/image]` "
    "word after its patches (identical markers: which image is whose comes from positions alone), trained with "
    "its own binary match label plus, at every readout, its own image's colour; targets are balanced over "
    "candidate slots, so chance is 1/K exactly and guessing by order cannot beat it",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=["video", "hybrid"], choices=sorted(ORDER))
    ap.add_argument("--lanes", type=int, default=2, help="runs trained at the same time (one thread each)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="train.seed of each run")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-video-hybrid",
                    help="run directories, <recipe>/seed<S>/<name> (not committed; finished runs are reused)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--only", nargs="*", default=None, help="subset of smoke config names")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override every config"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, n, s) for r in args.recipes for s in args.seeds for n in ORDER[r] if args.only is None or n in args.only]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.lanes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(run_one, *job, str(args.runs), args.overrides) for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    seeds = ", ".join(map(str, args.seeds))
    spread = f"mean ± std over seeds {seeds}" if len(args.seeds) > 1 else f"seed {seeds}"
    for recipe in args.recipes:
        names = list(dict.fromkeys(n for (r, n, _) in jobs if r == recipe))
        if not names:
            continue
        per_seed = {n: [done[(recipe, n, s)] for s in args.seeds] for n in names}
        rows = {n: summarize(runs) for n, runs in per_seed.items()}
        first = per_seed[names[0]][0]["eval"]
        base = args.out / f"{recipe}_bench"
        report = {
            "recipe": recipe,
            "configs": f"configs/{recipe}/smoke",
            "overrides": args.overrides,
            "seeds": args.seeds,
            "lanes": args.lanes,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), one thread per run",
            "torch": torch.__version__,
            "wall_seconds": time.perf_counter() - t0,
            "table": rows,
            "runs": {n: {str(r["seed"]): r for r in runs} for n, runs in per_seed.items()},
        }
        atomic_write_text(base.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        md = (f"## {TITLES[recipe]}\n\nTop-1 accuracy (%) on the validation split, {spread} (sample std); "
              f"`std % at train` is the std at the training size as a percentage of the mean; run times are means "
              f"over seeds, in wall-clock seconds on {report['machine']}, {args.lanes} runs at a time. Every seed's "
              f"numbers are in `{base.name}.json`.\n\n")
        atomic_write_text(base.with_suffix(".md"), md + markdown(recipe, first, rows))
        plot(recipe, first, rows, base.with_suffix(".png"), spread)
        print(md + markdown(recipe, first, rows), flush=True)


if __name__ == "__main__":
    main()

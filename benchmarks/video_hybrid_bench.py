"""Issue 9 at smoke scale: 3-D video and interleaved text + image, every method, larger inputs.

Trains every ``configs/video/smoke/*.yaml`` and/or ``configs/hybrid/smoke/*.yaml`` with the
shared training loop (one thread per run, ``--lanes`` runs at a time), evaluates each at its
config's ``eval.sizes`` (video: more frames and larger frames; hybrid: more images and larger
images), and writes ``benchmarks/results/{video,hybrid}_bench.{json,md,png}`` atomically, with
the wall-clock training and evaluation seconds of every run.

    OMP_NUM_THREADS=1 nohup python benchmarks/video_hybrid_bench.py --lanes 2 > benchmarks/results/video_hybrid_bench.log 2>&1 &
"""

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text
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


def run_one(recipe: str, name: str, runs: str, overrides: list[str]) -> dict[str, Any]:
    """Train and evaluate one smoke config (in a worker process with one thread)."""
    torch.set_num_threads(1)
    cls = get_recipe(recipe)
    config = load_config(REPO / "configs" / recipe / "smoke" / f"{name}.yaml", overrides)
    run_dir = Path(runs) / recipe / name
    train_s = train_or_reuse(
        lambda: cls.build_task(config, run_dir), config.train, run_dir, config=config.model_dump(mode="json")
    )
    t1 = time.perf_counter()
    result = cls.evaluate(run_dir, quiet=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in lines if x["split"] == "train"][-1]
    return {
        "name": name,
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


def markdown(recipe: str, rows: dict[str, dict[str, Any]], names: list[str]) -> str:
    first = rows[names[0]]["eval"]
    keys = list(first["sizes"])
    train = first["train_size"]
    chance = {k: first["sizes"][k].get("chance", 25.0) for k in keys}
    head = (
        ["method"]
        + [size_label(recipe, first["sizes"][k], train) for k in keys]
        + ["avg beyond train", "train s", "eval s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| chance | " + " | ".join(f"{chance[k]:.1f}" for k in keys) + " | | | |")
    for n in names:
        r = rows[n]
        accs = [r["eval"]["sizes"][k]["top1"] for k in keys]
        beyond = [
            a for k, a in zip(keys, accs) if [first["sizes"][k][AXES[recipe][0]], first["sizes"][k]["pixels"]] != train
        ]
        cells = [LABELS.get(n, n)] + [f"{a:.1f}" for a in accs]
        cells += [f"{sum(beyond) / max(len(beyond), 1):.1f}", f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(recipe: str, rows: dict[str, dict[str, Any]], names: list[str], path: Path) -> None:
    """Accuracy against the grown axis: left panel more frames/images, right panel larger frames/images."""
    from seqpe_nd.tasks.engine.plots import save_figure  # first: it selects the Agg backend

    import matplotlib.pyplot as plt

    a, b = AXES[recipe]
    first = rows[names[0]]["eval"]
    ta, tb = first["train_size"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, (grow, fixed, fixed_val, label) in zip(
        axes, ((a, b, tb, f"{a} (at {tb} px)"), (b, a, ta, f"pixels (with {ta} {a})"))
    ):
        for n in names:
            pts = sorted((r[grow], r["top1"]) for r in rows[n]["eval"]["sizes"].values() if r[fixed] == fixed_val)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(n, n))
        chance = sorted((r[grow], r.get("chance", 25.0)) for r in first["sizes"].values() if r[fixed] == fixed_val)
        ax.plot(
            [p[0] for p in chance], [p[1] for p in chance], color="grey", linestyle="--", linewidth=1, label="chance"
        )
        ax.axvline(ta if grow == a else tb, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{recipe}: accuracy beyond the training size (dotted line)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=["video", "hybrid"], choices=sorted(ORDER))
    ap.add_argument("--lanes", type=int, default=2, help="runs trained at the same time (one thread each)")
    ap.add_argument(
        "--runs", type=Path, default=Path("/tmp/seqpe-issue9-bench"), help="run directories (not committed)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="subset of smoke config names")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override every config"
    )
    ap.add_argument("--merge", action="store_true", help="keep the existing results' rows of methods not rerun")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    jobs = [(r, n) for r in args.recipes for n in ORDER[r] if args.only is None or n in args.only]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.lanes) as pool:
        futures = {job: pool.submit(run_one, *job, str(args.runs), args.overrides) for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    for recipe in args.recipes:
        names = [n for (r, n) in jobs if r == recipe]
        if not names:
            continue
        rows = {n: done[(recipe, n)] for n in names}
        base = RESULTS / f"{recipe}_bench"
        if args.merge and base.with_suffix(".json").is_file():
            kept = json.loads(base.with_suffix(".json").read_text())["runs"]
            rows = {n: rows[n] if n in rows else kept[n] for n in ORDER[recipe] if n in rows or n in kept}
            names = list(rows)
        report = {
            "recipe": recipe,
            "configs": f"configs/{recipe}/smoke",
            "overrides": args.overrides,
            "lanes": args.lanes,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), one thread per run",
            "torch": torch.__version__,
            "wall_seconds": time.perf_counter() - t0,
            "runs": rows,
        }
        atomic_write_text(base.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        title = {
            "video": "Video (3-D): trained at 4 frames × 24 px",
            "hybrid": 'Interleaved text + image: trained with a reference and 2 candidate images of 24 px ("images" = candidates)',
        }[recipe]
        md = f"## {title}\n\nAccuracy (%) on the validation split; run times in wall-clock seconds on {report['machine']}.\n\n"
        atomic_write_text(base.with_suffix(".md"), md + markdown(recipe, rows, names))
        plot(recipe, rows, names, base.with_suffix(".png"))
        print(md + markdown(recipe, rows, names), flush=True)


if __name__ == "__main__":
    main()

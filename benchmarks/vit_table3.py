"""Table 3 and Table 5 analogues at smoke scale over several seeds, with speed as a ratio to APE-learn.

Trains every ``configs/vit/smoke/*.yaml`` (tiny ViT, procedural data, R = 24 px, 6 x 6 patches)
with the shared training loop once per seed (``--set train.seed=S``; the seed also draws the
procedural scenes, validation included), evaluates each at Table 3's resolutions scaled to R
(24 … 72 px: resize 256/224·S, centre-crop S), then measures training and inference images/s of
every method on the same fixed batches, one method after another in one process (so the speed
ratios compare like with like; measured once: speed is not a seed's). Top-1 cells are the mean ±
sample std (n - 1) over the seeds. Runs go to ``<runs>/seed<S>/<method>`` (finished ones are reused,
interrupted ones resumed), seeds × methods on one pool of ``--lanes`` workers. Writes
``benchmarks/results/vit_table3.{json,md,png}``, ``vit_table5.png`` and the Fig. 3 similarity maps
of the first seed's learned-PE runs, all atomically.

    OMP_NUM_THREADS=1 nohup python benchmarks/vit_table3.py --lanes 2 > benchmarks/results/vit_table3.log 2>&1 &
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from seqpe_nd.tasks.engine.checkpoint import atomic_write_bytes, atomic_write_text
from seqpe_nd.tasks.engine.evaluation import fmt_spread
from seqpe_nd.tasks.engine.plots import plot_accuracy
from seqpe_nd.tasks.engine.trainer import train_or_reuse
from seqpe_nd.tasks.recipes import load_config
from seqpe_nd.tasks.recipes.vit import SIMILARITY_PNG, ViTRecipe

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ORDER = (
    "nope",
    "ape_sin",
    "ape_learn",
    "rope_axial",
    "rope_mixed",
    "seqpe_attn_mul",
    "seqpe_attn_sum",
    "seqpe_attn_bias",
)
TABLE5 = ("seqpe_attn_sum", "seqpe_attn_bias", "seqpe_attn_mul")
LABELS = {
    "nope": "NoPE",
    "ape_sin": "APE-sin",
    "ape_learn": "APE-learn",
    "rope_axial": "RoPE2D (axial)",
    "rope_mixed": "RoPE2D-Mixed",
    "seqpe_attn_mul": "SeqPE AttnMul",
    "seqpe_attn_sum": "SeqPE AttnSum",
    "seqpe_attn_bias": "SeqPE AttnBias",
}


def run_one(name: str, seed: int, runs: str, max_images: int | None, overrides: list[str]) -> dict[str, Any]:
    """Train and evaluate one smoke config with one seed (in a worker process with one thread)."""
    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "vit" / "smoke" / f"{name}.yaml", [*overrides, f"train.seed={seed}"])
    run_dir = Path(runs) / f"seed{seed}" / name
    print(f"start {name} seed {seed}: {run_dir}", flush=True)
    train_s = train_or_reuse(
        lambda: ViTRecipe.build_task(config, run_dir), config.train, run_dir, config=config.model_dump(mode="json")
    )
    t1 = time.perf_counter()
    result = ViTRecipe.evaluate(run_dir, max_images=max_images, quiet=True)
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


def speed(name: str, *, steps: int = 10, batch: int = 48) -> dict[str, float]:
    """Training and inference images/s of one method on fixed batches (after one warm-up step)."""
    torch.manual_seed(0)
    config = load_config(REPO / "configs" / "vit" / "smoke" / f"{name}.yaml")
    task = ViTRecipe.build_task(config, Path("unused"))
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = task.train_batch(0, 0, 0, 1)
    R = task.cfg.model.img_size
    times = []
    for i in range(steps + 1):  # step 0 warms up
        t = time.perf_counter()
        loss, _ = task.loss(model, data, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    model.eval()
    out = {"train_images_per_s": batch / statistics.median(times)}
    with torch.no_grad():
        for s in (R, 3 * R):
            x = torch.randn(batch, 3, s, s)
            model(x)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                model(x)
                ts.append(time.perf_counter() - t)
            out[f"infer_images_per_s_{s}"] = batch / statistics.median(ts)
    return out


def markdown(
    rows: dict[str, dict[str, Any]], names: tuple[str, ...], title: str, speeds: dict[str, dict[str, float]] | None
) -> str:
    """A table of ``ViTRecipe.summarize_seeds`` rows: top-1 mean ± std per resolution, its std % at R, speeds."""
    first = rows[names[0]]
    sizes = sorted(first["top1"], key=int)
    R = first["train_resolution"]
    head = ["method"] + [f"{s} ({int(s) / R:.2g}×)" for s in sizes] + ["avg", f"std % at {R}", "train s", "eval s"]
    if speeds:
        head += ["train img/s (× APE-learn)", f"infer img/s at {R} (×)", f"infer img/s at {3 * R} (×)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = speeds.get("ape_learn") if speeds else None
    for n in names:
        r = rows[n]
        mean, std = r["top1"].get(str(R)), r["std"].get(str(R))
        cells = (
            [LABELS.get(n, n)]
            + [fmt_spread(r["top1"][s], r["std"][s], 1) for s in sizes]
            + [fmt_spread(r["avg"], r["avg_std"], 1)]
            + ["-" if mean is None or std is None or mean == 0 else f"{100 * std / mean:.1f}"]
            + [f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        )
        if speeds and ref:
            sp = speeds[n]
            for key in ("train_images_per_s", f"infer_images_per_s_{R}", f"infer_images_per_s_{3 * R}"):
                cells.append(f"{sp[key]:.0f} ({sp[key] / ref[key]:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], names: tuple[str, ...], path: Path, title: str) -> None:
    """Mean top-1 against resolution with ± std error bars, one line per method."""
    means = {
        LABELS[n]: {"resolutions": {s: {"top1": v} for s, v in rows[n]["top1"].items()},
                    "train_resolution": rows[n]["train_resolution"]}
        for n in names
    }
    plot_accuracy(means, path, title=title, std={LABELS[n]: rows[n]["std"] for n in names})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", type=int, default=2, help="runs trained at the same time (one thread each)")
    ap.add_argument(
        "--runs", type=Path, default=Path("/tmp/seqpe-vit-bench"),
        help="where run directories go, <runs>/seed<S>/<method> (not committed)",
    )
    ap.add_argument(
        "--max-images", type=int, default=None, help="evaluation images per resolution (default: the config's 512)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="subset of smoke configs")
    ap.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
        help="training seeds (train.seed) of every method (default 0 1 2); the table needs them all",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for every run (a dry run)"
    )
    ap.add_argument("--speed-steps", type=int, default=10, help="timed training steps per method (0: no speed columns)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    names = tuple(args.only or ORDER)
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        ap.error(f"unknown smoke config(s) {unknown}; allowed: {' '.join(ORDER)}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {args.seeds}: give distinct seeds")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Seed after seed; within a seed longest first (SeqPE runs carry the regularizer), so the lanes finish together.
    queue = [(n, seed) for seed in args.seeds for n in sorted(names, key=lambda n: not n.startswith("seqpe"))]
    results: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in args.seeds}
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=args.lanes) as pool:
        futures = {
            pool.submit(run_one, n, seed, str(args.runs), args.max_images, args.overrides): (n, seed)
            for n, seed in queue
        }
        for future in as_completed(futures):
            n, seed = futures[future]
            if (err := future.exception()) is not None:
                failed.append(f"{n} seed {seed}: {err!r}")
                print(f"failed {n} seed {seed}: {err!r}", flush=True)
                continue
            res = results[seed][n] = future.result()
            acc = {s: round(v["top1"], 1) for s, v in res["eval"]["resolutions"].items()}
            print(
                f"[{time.perf_counter() - t0:6.0f}s] done {n} seed {seed} ({sum(map(len, results.values()))}/"
                f"{len(queue)}): train {res['train_seconds']:.0f}s, eval {res['eval_seconds']:.0f}s, top-1 {acc}",
                flush=True,
            )
    if failed:  # never a table over fewer seeds than asked for; the finished runs are reused next time
        raise SystemExit(f"{len(failed)} of {len(queue)} runs failed, no table written: " + "; ".join(failed))
    torch.set_num_threads(1)
    speeds = {}
    for n in names if args.speed_steps else ():
        speeds[n] = speed(n, steps=args.speed_steps)
        print(f"[{time.perf_counter() - t0:6.0f}s] speed {n}: {speeds[n]}", flush=True)
    total = time.perf_counter() - t0

    ordered = [n for n in ORDER if n in names]
    rows = ViTRecipe.summarize_seeds(
        {seed: {n: {**by[n]["eval"], "train_seconds": by[n]["train_seconds"], "eval_seconds": by[n]["eval_seconds"]}
                for n in ordered}
         for seed, by in results.items()}
    )
    first = args.seeds[0]
    for n in ordered:
        rows[n]["train_resolution"] = results[first][n]["eval"]["train_resolution"]
    config = load_config(REPO / "configs" / "vit" / "smoke" / f"{ordered[0]}.yaml", args.overrides)
    steps, R = config.train.steps, config.model.img_size
    seeds = ", ".join(map(str, args.seeds))
    spread = f"mean ± std over seeds {seeds}" if len(args.seeds) > 1 else f"seed {seeds}"
    md = [
        "## ViT smoke-scale Table 3 / Table 5 analogues",
        "",
        "Tiny timm ViT (48 wide, 3 blocks, 3 heads, 4-px patches) trained at R = 24 px (6 × 6 grid) "
        f"for {steps} steps × 48 images on the embedded procedural data (4 classes: red shape left of / right of / "
        "above / below the blue one; chance 25 %), evaluated on 512 validation scenes at Table 3's resolutions "
        "scaled to R (224 … 672 → 24 … 72 px; resize 256/224·S, centre-crop S, patch grid 6 → 18). "
        f"Seeds (`train.seed`, which also draws the scenes) {seeds}, one run each; top-1 cells are the {spread} "
        f"(sample std, n - 1), `avg` the mean over resolutions (its spread over seeds), `std % at {R}` the std at "
        "the training resolution as a percentage of the mean; times are means over seeds; every seed's numbers "
        "are in `vit_table3.json`. "
        f"CPU, {args.lanes} runs at a time with one thread each on a shared 2-core machine; "
        f"whole benchmark {total / 60:.1f} min. Speeds (measured once, not per seed): median over fixed batches "
        "of 48, one method after another in one process, "
        "as a ratio to APE-learn (noisy on a shared CPU).",
        "",
        markdown(rows, tuple(ordered), f"Table 3 analogue: top-1 (%) vs evaluation resolution, {spread}", speeds),
    ]
    t5 = tuple(n for n in TABLE5 if n in rows)
    if t5:
        md.append(markdown(rows, t5, f"Table 5 analogue: SeqPE integrations (one W_PE per layer), {spread}", None))
    atomic_write_text(out / "vit_table3.md", "\n".join(md))
    payload = {
        "total_seconds": total, "lanes": args.lanes, "seeds": args.seeds, "overrides": args.overrides,
        "table3": {n: rows[n] for n in ordered}, "table5": {n: rows[n] for n in t5},
        "runs": {str(seed): {n: by[n] for n in ordered} for seed, by in results.items()}, "speed": speeds,
    }
    atomic_write_text(out / "vit_table3.json", json.dumps(payload, indent=1) + "\n")
    plot(rows, tuple(ordered), out / "vit_table3.png",
         f"smoke Table 3: top-1 vs resolution (trained at {R} px, 4-px patches)\n{spread}")
    if t5:
        plot(rows, t5, out / "vit_table5.png", f"smoke Table 5: SeqPE integrations\n{spread}")
    for n in ordered:  # Fig. 3 maps of the first seed's runs
        sim = Path(results[first][n]["run_dir"]) / SIMILARITY_PNG
        if sim.is_file():
            atomic_write_bytes(out / f"vit_similarity_{n}.png", sim.read_bytes())
    print("\n".join(md))


if __name__ == "__main__":
    main()

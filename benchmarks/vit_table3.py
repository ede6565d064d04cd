"""Table 3 and Table 5 analogues at smoke scale, with speed as a ratio to APE-learn.

Trains every ``configs/vit/smoke/*.yaml`` (tiny ViT, procedural data, R = 24 px, 6 x 6 patches)
with the shared training loop, evaluates each at Table 3's resolutions scaled to R (24 … 72 px:
resize 256/224·S, centre-crop S), then measures training and inference images/s of every method
on the same fixed batches, one method after another in one process (so the speed ratios compare
like with like). Writes ``benchmarks/results/vit_table3.{json,md,png}``, ``vit_table5.png`` and the
Fig. 3 similarity maps of the learned-PE runs, all atomically.

    OMP_NUM_THREADS=1 nohup python benchmarks/vit_table3.py --lanes 2 > benchmarks/results/vit_table3.log 2>&1 &
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from seqpe_nd.tasks.engine.checkpoint import atomic_write_bytes, atomic_write_text
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


def run_one(name: str, runs: str, max_images: int | None, overrides: list[str]) -> dict[str, Any]:
    """Train and evaluate one smoke config (in a worker process with one thread)."""
    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "vit" / "smoke" / f"{name}.yaml", overrides)
    run_dir = Path(runs) / name
    train_s = train_or_reuse(
        lambda: ViTRecipe.build_task(config, run_dir), config.train, run_dir, config=config.model_dump(mode="json")
    )
    t1 = time.perf_counter()
    result = ViTRecipe.evaluate(run_dir, max_images=max_images, quiet=True)
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
    first = rows[names[0]]["eval"]
    sizes = list(first["resolutions"])
    R = first["train_resolution"]
    head = ["method"] + [f"{s} ({int(s) / R:.2g}×)" for s in sizes] + ["avg", "train s", "eval s"]
    if speeds:
        head += ["train img/s (× APE-learn)", f"infer img/s at {R} (×)", f"infer img/s at {3 * R} (×)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = speeds.get("ape_learn") if speeds else None
    for n in names:
        r = rows[n]
        accs = [r["eval"]["resolutions"][s]["top1"] for s in sizes]
        cells = (
            [LABELS.get(n, n)]
            + [f"{a:.1f}" for a in accs]
            + [f"{sum(accs) / len(accs):.1f}", f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        )
        if speeds and ref:
            sp = speeds[n]
            for key in ("train_images_per_s", f"infer_images_per_s_{R}", f"infer_images_per_s_{3 * R}"):
                cells.append(f"{sp[key]:.0f} ({sp[key] / ref[key]:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", type=int, default=2, help="runs trained at the same time (one thread each)")
    ap.add_argument(
        "--runs", type=Path, default=Path("/tmp/seqpe-vit-bench"), help="where run directories go (not committed)"
    )
    ap.add_argument(
        "--max-images", type=int, default=None, help="evaluation images per resolution (default: the config's 512)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="subset of smoke configs")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override for every run (a dry run)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args()
    names = tuple(args.only or ORDER)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Longest first (SeqPE runs carry the regularizer), so the lanes finish together.
    queue = sorted(names, key=lambda n: not n.startswith("seqpe"))
    rows: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=args.lanes) as pool:
        for res in pool.map(
            run_one, queue, [str(args.runs)] * len(queue), [args.max_images] * len(queue), [args.overrides] * len(queue)
        ):
            rows[res["name"]] = res
            acc = {s: round(v["top1"], 1) for s, v in res["eval"]["resolutions"].items()}
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {res['name']}: train {res['train_seconds']:.0f}s, "
                f"eval {res['eval_seconds']:.0f}s, top-1 {acc}",
                flush=True,
            )
    torch.set_num_threads(1)
    speeds = {}
    for n in names:
        speeds[n] = speed(n)
        print(f"[{time.perf_counter() - t0:6.0f}s] speed {n}: {speeds[n]}", flush=True)
    total = time.perf_counter() - t0

    ordered = [n for n in ORDER if n in rows]
    steps = load_config(REPO / "configs" / "vit" / "smoke" / f"{ordered[0]}.yaml", args.overrides).train.steps
    md = [
        "## ViT smoke-scale Table 3 / Table 5 analogues",
        "",
        "Tiny timm ViT (48 wide, 3 blocks, 3 heads, 4-px patches) trained at R = 24 px (6 × 6 grid) "
        f"for {steps} steps × 48 images on the embedded procedural data (4 classes: red shape left of / right of / "
        "above / below the blue one; chance 25 %), evaluated on 512 validation scenes at Table 3's resolutions "
        "scaled to R (224 … 672 → 24 … 72 px; resize 256/224·S, centre-crop S, patch grid 6 → 18). "
        f"CPU, {args.lanes} runs at a time with one thread each on a shared 2-core machine; "
        f"whole benchmark {total / 60:.1f} min. Speeds: median over fixed batches of 48, "
        "one method after another in one process, "
        "as a ratio to APE-learn (noisy on a shared CPU).",
        "",
        markdown(rows, tuple(ordered), "Table 3 analogue: top-1 (%) vs evaluation resolution", speeds),
    ]
    t5 = tuple(n for n in TABLE5 if n in rows)
    if t5:
        md.append(markdown(rows, t5, "Table 5 analogue: SeqPE integrations (one W_PE per layer)", None))
    atomic_write_text(out / "vit_table3.md", "\n".join(md))
    atomic_write_text(
        out / "vit_table3.json",
        json.dumps({"total_seconds": total, "lanes": args.lanes, "runs": rows, "speed": speeds}, indent=1) + "\n",
    )
    plot_accuracy(
        {LABELS[n]: rows[n]["eval"] for n in ordered},
        out / "vit_table3.png",
        title="smoke Table 3: top-1 vs resolution (trained at 24 px, 4-px patches)",
    )
    if t5:
        plot_accuracy(
            {LABELS[n]: rows[n]["eval"] for n in t5}, out / "vit_table5.png", title="smoke Table 5: SeqPE integrations"
        )
    for n in ordered:
        sim = Path(rows[n]["run_dir"]) / SIMILARITY_PNG
        if sim.is_file():
            atomic_write_bytes(out / f"vit_similarity_{n}.png", sim.read_bytes())
    print("\n".join(md))


if __name__ == "__main__":
    main()

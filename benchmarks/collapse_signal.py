"""SeqPE's collapse signals on a healthy and a collapsed run: ``pe_spread`` against ``pe_cos``, and the warning.

Reads the training records of finished runs (``metrics.jsonl``), keeps the unshifted steps (a shifted step's
rows start far apart, so the trainer logs no ``pe_spread`` for it), replays the trainer's ``CollapseWatch`` over
them, and writes ``benchmarks/results/collapse_signal.{json,md,png}``: both signals per logged step (log scale),
the COLLAPSED_SPREAD line, where the watch starts and where it warns, and each run's test perplexity.

    python benchmarks/collapse_signal.py --run healthy=runs/calib/gpt2-s0.15/seqpe --run collapsed=runs/calib/gpt2-s1.0/seqpe
"""

import argparse
import json
from pathlib import Path
from typing import Any

from seqpe_nd.encodings.seqpe import COLLAPSED_SPREAD
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text
from seqpe_nd.tasks.engine.collapse import CollapseWatch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def replay(run: Path) -> dict[str, Any]:
    config = json.loads((run / "config.json").read_text())
    train = config["train"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logs = [r for r in records if r.get("split") == "train" and not r.get("shifted") and "pe_spread" in r]
    watch = CollapseWatch(train["warmup_steps"], train["steps"])
    warned = None
    for r in logs:
        if watch.update(r["step"] - 1, r) and warned is None:
            warned = r["step"]
    ppl = None
    if (run / "eval.json").is_file():
        ppl = {k: v["ppl"] for k, v in json.loads((run / "eval.json").read_text())["lengths"].items()}
    encoder_lr = min(config["pe"].get("encoder_lr_scale", 1.0) * train["lr"], config["pe"].get("encoder_lr_max") or 1e9)
    return {"run": str(run), "encoder_lr": encoder_lr, "watch_from": watch.start, "warned_at": warned, "ppl": ppl,
            "steps": [r["step"] for r in logs], "pe_spread": [r["pe_spread"] for r in logs],
            "pe_cos": [r.get("pe_cos") for r in logs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "metrics.jsonl").is_file():
            parser.error(f"--run {item}: expected LABEL=RUN_DIR with a metrics.jsonl")
        runs[label] = replay(Path(path))
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "collapse_signal.json", json.dumps({"collapsed_spread": COLLAPSED_SPREAD, "runs": runs}, indent=1) + "\n")

    marks = (100, 300, 450, 500, 600, 900, 1200, 1500)
    lines = ["# SeqPE's collapse signal on a healthy and a collapsed run (GPT-2 smoke, seed 0)\n",
             f"`pe_spread` (std over keys of the position scores, attention logits; collapsed below {COLLAPSED_SPREAD}) and "
             "`pe_cos` (mean cosine of the position embeddings) on unshifted logged steps; the warning replayed with the "
             "trainer's `CollapseWatch`. Produced by `benchmarks/collapse_signal.py`.\n",
             "| run | encoder peak lr | ppl 128 → 2048 | watch from step | warned at | " + " | ".join(f"step {m}" for m in marks) + " |",
             "|---|---:|---|---:|---:|" + "---:|" * len(marks)]
    for label, r in runs.items():
        def at(step: int) -> str:
            near = min(range(len(r["steps"])), key=lambda i: abs(r["steps"][i] - step))
            return f"{r['pe_spread'][near]:.3f} / {r['pe_cos'][near]:.3f}"
        ppl = f"{r['ppl'][str(min(map(int, r['ppl'])))]:.1f} → {r['ppl'][str(max(map(int, r['ppl'])))]:.1f}" if r["ppl"] else "-"
        lines.append(f"| {label} | {r['encoder_lr']:.0e} | {ppl} | {r['watch_from']} | {r['warned_at'] or 'no'} | "
                     + " | ".join(at(m) for m in marks) + " |")
    lines.append("\nCells: `pe_spread / pe_cos` at the nearest unshifted logged step.")
    atomic_write_text(args.results / "collapse_signal.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in runs.items():
        a.semilogy(r["steps"], [max(v, 1e-5) for v in r["pe_spread"]], label=label)
        b.plot(r["steps"], r["pe_cos"], label=label)
        if r["warned_at"]:
            a.axvline(r["warned_at"], ls=":", color="grey")
    a.axhline(COLLAPSED_SPREAD, ls="--", color="red", label=f"collapsed below {COLLAPSED_SPREAD}")
    a.set(xlabel="training step", ylabel="pe_spread (attention logits, log scale)", title="pe_spread")
    b.set(xlabel="training step", ylabel="pe_cos (mean cosine)", title="pe_cos: above 0.94 on both")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(args.results / "collapse_signal.png", dpi=110)
    print(f"wrote {args.results}/collapse_signal.json, .md, .png")


if __name__ == "__main__":
    main()

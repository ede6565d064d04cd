"""SeqPE encoder cost: one training step's forward+backward at the paper's settings, and eval lookups.

    python benchmarks/encoder.py            # writes benchmarks/results/encoder.{json,md}
    python benchmarks/encoder.py --quick    # smaller hidden sizes, a smoke run

Training step = ``SeqPERegularizer.step`` (samplers + one deduplicated encoder call over
[main | pivots | candidates | teachers | students]) + backward of α·L_δ + β·L_OOD + a stand-in
main loss on the main-task embeddings. Main-task positions are the same for every sequence of
the batch (an unshifted step), so dedup should make the cost flat in the batch size.

Batch sizes take turns within each repeat (1, 8, 32, 1, 8, 32, ...), so a shared machine's load
drift lands on all of them alike.

Eval = a cached-table lookup of 16 384 1-D positions through ``SeqPE.forward`` (eval mode, no
grad) against ``nn.Embedding`` (a learned APE) of the same width. Medians; torch.utils.benchmark
for the lookups.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from seqpe_nd.encoder import SeqPE
from seqpe_nd.positions import load_space
from seqpe_nd.regularizers import SeqPERegularizer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: (space config, hidden = d_model); L_OOD heads = hidden // 64 like the encoder's own
    "text": ("text-512.yaml", 768),
    "image": ("image-14x14.yaml", 384),
}


def train_step_seconds(name: str, batches: tuple[int, ...], repeats: int, hidden: int) -> list[dict]:
    """Median seconds per step for each batch size; batch sizes take turns so load drift hits all alike."""
    config, _ = SETTINGS[name]
    heads = max(1, hidden // 64)
    space = load_space(ROOT / "configs" / "positions" / config)
    torch.manual_seed(0)
    enc = SeqPE(space, hidden, hidden=hidden, init="normal" if name == "text" else "trunc_normal")
    reg = SeqPERegularizer(space, alpha=0.1, beta=0.1, ood_heads=heads)
    times: dict[int, list[float]] = {b: [] for b in batches}
    encoded: dict[int, list[int]] = {b: [] for b in batches}
    real = enc.encode_unique
    current: list[int] = [0]

    def counted(pos: torch.Tensor) -> torch.Tensor:
        encoded[current[0]].append(len(pos))
        return real(pos)

    enc.encode_unique = counted  # type: ignore[method-assign]
    gens = {b: torch.Generator().manual_seed(0) for b in batches}  # same samples for every batch size
    for i in range(repeats + 1):  # first round: warmup
        for b in batches:
            main = space.positions().expand(b, -1, -1)  # (b, L, w): 512 tokens, or 14x14 patches
            current[0] = b
            enc.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = reg.step(enc, main, gens[b], shifted=False)
            (out.embeddings.square().mean() + out.loss).backward()
            if i:
                times[b].append(time.perf_counter() - t0)
    c, o = space.contrastive, space.ood
    return [
        {
            "setting": name, "batch": b, "hidden": hidden, "median_s": statistics.median(times[b]), "runs_s": times[b],
            "positions_requested": b * math.prod(space.L) + c.batch * (1 + c.num_candidates) + 2 * o.num_starts * o.num_teachers,
            "positions_encoded": statistics.median(encoded[b]),
        }
        for b in batches
    ]


def lookup_seconds(hidden: int, num: int = 16384) -> dict:
    space = load_space(ROOT / "configs" / "positions" / "text-512.yaml")
    torch.manual_seed(0)
    enc = SeqPE(space, hidden, hidden=hidden).eval()
    t0 = time.perf_counter()
    enc.export_table(num)  # builds the table once
    build = time.perf_counter() - t0
    ape = nn.Embedding(num, hidden)
    pos = torch.arange(num)[None, :, None]  # (1, n, 1) explicit positions
    idx = torch.arange(num)[None]  # (1, n) APE indices
    with torch.no_grad():
        torch.testing.assert_close(enc(pos)[0], enc.export_table(num))  # served from the table
        seqpe = benchmark.Timer("enc(pos)", globals={"enc": enc, "pos": pos}).blocked_autorange(min_run_time=2.0)
        table = benchmark.Timer("ape(idx)", globals={"ape": ape, "idx": idx}).blocked_autorange(min_run_time=2.0)
    return {
        "positions": num, "hidden": hidden, "table_build_s": build, "seqpe_lookup_median_s": seqpe.median,
        "ape_lookup_median_s": table.median, "ratio": seqpe.median / table.median,
    }


def markdown(result: dict) -> str:
    lines = [
        "# SeqPE encoder cost (CPU)",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} threads; "
        f"load average at start {result['load_start']}, at end {result['load_end']} (shared box: absolute "
        "times are noisy, compare within a table).",
        "",
        "## Training step: regularizer sampling + one deduplicated encoder forward + backward",
        "",
        "| setting | hidden | batch | positions requested | positions encoded | median s/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["train_step"]:
        lines.append(
            f"| {r['setting']} | {r['hidden']} | {r['batch']} | {r['positions_requested']} | "
            f"{r['positions_encoded']:.0f} | {r['median_s']:.3f} |"
        )
    lk = result["lookup"]
    lines += [
        "",
        f"## Eval: {lk['positions']} positions, width {lk['hidden']}",
        "",
        "| what | median |",
        "|---|---:|",
        f"| SeqPE table build (once, `export_table`) | {lk['table_build_s']:.3f} s |",
        f"| SeqPE cached lookup (`enc(pos)`, eval, no grad) | {lk['seqpe_lookup_median_s'] * 1e3:.3f} ms |",
        f"| learned APE lookup (`nn.Embedding`) | {lk['ape_lookup_median_s'] * 1e3:.3f} ms |",
        f"| ratio SeqPE / APE | {lk['ratio']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 64, one repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell after one warmup (default 3)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for encoder.json/.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core box a second thread spin-waits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    cells = []
    for name, (_, hidden) in SETTINGS.items():
        for cell in train_step_seconds(name, (1, 8, 32), 1 if args.quick else args.repeats, 64 if args.quick else hidden):
            print(f"{name:5s} hidden {cell['hidden']:3d} batch {cell['batch']:2d}: {cell['median_s']:.3f} s/step, "
                  f"{cell['positions_encoded']:.0f} of {cell['positions_requested']} positions encoded", flush=True)
            cells.append(cell)
    lookup = lookup_seconds(64 if args.quick else 768)
    print(f"lookup of 16384: SeqPE {lookup['seqpe_lookup_median_s'] * 1e3:.3f} ms, APE {lookup['ape_lookup_median_s'] * 1e3:.3f} ms, "
          f"ratio {lookup['ratio']:.2f}", flush=True)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
        "quick": args.quick, "train_step": cells, "lookup": lookup,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "encoder-quick" if args.quick else "encoder"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

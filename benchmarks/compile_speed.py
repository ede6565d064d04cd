"""Eager vs ``torch.compile`` training-step time of every recipe's smoke model, per position encoding.

Each row builds a shipped smoke config's model twice from one seed, compiles one copy (``torch.compile``, the
trainer's ``train.compile: true``; default backend inductor), and times the recipe's own training step on both:
``Recipe.loss`` (the random shift, the PE's host-side draws, the forward, the task loss + the PE's auxiliary
loss), backward and an AdamW step, on the config's batches. The two models are stepped in turn (eager, compiled,
eager, ...) so a shared machine's load hits both alike; the table gives the median step of each, their ratio,
the first compiled step (compilation included) and what dynamo made of the step: graphs and graph breaks.
The QA recipe fine-tunes the LM recipe's GPT-2 (same backbone, same step), so its rows are the LM ones.

    python benchmarks/compile_speed.py                      # results/compile_speed.{json,md}, CPU, one thread
    python benchmarks/compile_speed.py --configs configs/vit/smoke/nope.yaml --steps 4 --out /tmp/cs.json
    python benchmarks/compile_speed.py --device cuda --threads 0   # a GPU (benchmarks/gpu.py runs this too)
"""

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch._dynamo as dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOKE = (
    "configs/lm/smoke/gpt2_stock.yaml", "configs/lm/smoke/nope.yaml", "configs/lm/smoke/ape_learn.yaml",
    "configs/lm/smoke/rope.yaml", "configs/lm/smoke/alibi.yaml", "configs/lm/smoke/seqpe.yaml",
    "configs/vit/smoke/nope.yaml", "configs/vit/smoke/rope_axial.yaml", "configs/vit/smoke/seqpe_attn_mul.yaml",
    "configs/video/smoke/nope.yaml", "configs/video/smoke/seqpe.yaml",
    "configs/hybrid/smoke/nope.yaml", "configs/hybrid/smoke/seqpe.yaml",
)


def measure(config: str, *, steps: int, warmup: int, backend: str, device: torch.device) -> dict[str, Any]:
    """Eager and compiled step times of one smoke config (its model, batches and step)."""
    from seqpe_nd.tasks.recipes import get_recipe, load_config

    cfg = load_config(ROOT / config)
    recipe = get_recipe(cfg.task)
    with tempfile.TemporaryDirectory() as tmp:
        task = recipe.build_task(cfg, Path(tmp))
        task.prepare_data()
        torch.manual_seed(cfg.train.seed)
        eager = task.build_model().to(device).train()
        twin = copy.deepcopy(eager)
        dynamo.reset()
        counters.clear()
        compiled = torch.compile(twin, backend=backend)
        models = {"eager": (eager, torch.optim.AdamW(eager.parameters(), lr=1e-4)),
                  "compiled": (compiled, torch.optim.AdamW(twin.parameters(), lr=1e-4))}
        generators = {name: torch.Generator().manual_seed(cfg.train.seed) for name in models}
        times: dict[str, list[float]] = {name: [] for name in models}
        first_compiled = 0.0
        for i in range(warmup + steps):
            batch = task.train_batch(i, 0, 0, 1)
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch
            for name, (model, opt) in models.items():
                sync(device)
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss, _ = task.loss(model, batch, generator=generators[name])
                loss.backward()
                opt.step()
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
                elif i == 0 and name == "compiled":
                    first_compiled = time.perf_counter() - t
        breaks = sum(counters["graph_break"].values())
        graphs = int(counters["stats"]["unique_graphs"])
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "config": config, "task": cfg.task, "method": cfg.pe.method if cfg.pe is not None else None,
        "arch": getattr(cfg.model, "arch", None), "batch": cfg.train.batch_size,
        "eager_ms": 1e3 * e, "compiled_ms": 1e3 * c, "compiled_over_eager": c / e,
        "first_compiled_step_s": first_compiled, "graphs": graphs, "graph_breaks": breaks,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def label(row: dict[str, Any]) -> str:
    return "stock" if row["arch"] == "gpt2_stock" else str(row["method"])


def table(rows: Sequence[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| recipe | method | batch | eager ms/step | compiled ms/step | compiled / eager | "
             "first compiled step s | graphs | graph breaks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {label(r)} | {r['batch']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
                     f"{r['compiled_over_eager']:.2f} | {r['first_compiled_step_s']:.1f} | {r['graphs']} | "
                     f"{r['graph_breaks']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(SMOKE), help="smoke configs (paths from the repo root)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, recompilations)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # the first compiled step times a cold compilation
    device = torch.device(args.device)
    rows = []
    for config in args.configs:
        t = time.perf_counter()
        rows.append(measure(config, steps=args.steps, warmup=args.warmup, backend=args.backend, device=device))
        r = rows[-1]
        print(f"{config}: eager {r['eager_ms']:.1f} ms, compiled {r['compiled_ms']:.1f} ms "
              f"({r['compiled_over_eager']:.2f}x), {r['graph_breaks']} breaks [{time.perf_counter() - t:.0f} s]",
              flush=True)
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}, {threads} thread(s))"
    header = (f"Training step, eager vs torch.compile (backend {args.backend}), {where}; torch {torch.__version__}; "
              f"median of {args.steps} steps after {args.warmup}, the two models stepped in turn. Written by "
              "`benchmarks/compile_speed.py`.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "backend": args.backend, "device": where, "rows": rows},
                                   indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(rows, header))
    print(table(rows, header))


if __name__ == "__main__":
    main()

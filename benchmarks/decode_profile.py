"""Where SeqPE's cached decoding spends its time over stock GPT-2's, and what it adds in FLOPs.

The models of ``benchmarks/decode.py`` (a random-init 4-layer, 128-wide GPT-2; SeqPE attn_bias with one W_PE,
whose decoding step adds one position-score bias shared by the layers). For each prompt length: the prompt is
prefilled once, then ``--steps`` cached decoding steps (one new token each, the HF ``DynamicCache``) run under
``torch.profiler`` for stock GPT-2, for NoPE through the same adapter as SeqPE (GPT2WithPE) and for SeqPE,
stepped in turn, ``--rounds`` times after one untimed round; each operator's self CPU time per step is the
median over rounds. SeqPE's extra time is split by operator against NoPE's (same adapter, same cache: the
difference is the method), next to the FLOPs of one step (``torch.utils.flop_counter``) of each model: what
SeqPE adds in arithmetic against what it adds in time. The prefill is timed and counted alike. Writes
``results/decode_profile.{json,md}``.

    python benchmarks/decode_profile.py                      # prompts 1024 and 4096, 256 steps, 3 rounds
    python benchmarks/decode_profile.py --prompts 1024 --steps 16 --rounds 1 --out /tmp/dp
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from decode import VOCAB, build  # benchmarks/decode.py: the same models

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("stock", "nope", "seqpe")


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """The CPU kernel of SDPA counts as the CUDA ones do (q·k and weights·v; a causal mask does not halve it)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[Any, torch.Tensor]:
    out = model(input_ids=prompt, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model: torch.nn.Module, cache: Any, token: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """``steps`` greedy cached steps from position ``start`` (the cache holds the prompt)."""
    for i in range(steps):
        pos = torch.tensor([[start + i]])
        out = model(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return token


def step_flops(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one cached decoding step after ``prompt``, in total and by operator."""
    cache, token = prefill(model, prompt)
    counter = FlopCounterMode(display=False)
    with counter:
        decode(model, cache, token, prompt.shape[1], 1)
    by_op = {".".join(str(op).split(".")[:2]): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def step_times(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, dict[str, float]]:
    """Seconds per decoding step, in total (wall) and by operator (self CPU), over ``steps`` steps."""
    cache, token = prefill(model, prompt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, cache, token, prompt.shape[1], steps)
    by_op = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    return sum(by_op.values()), by_op


def prefill_cost(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, int]:
    """Seconds and FLOPs of the prefill (the prompt's forward that fills the cache)."""
    t = time.perf_counter()
    prefill(model, prompt)
    seconds = time.perf_counter() - t
    counter = FlopCounterMode(display=False)
    with counter:
        prefill(model, prompt)
    return seconds, int(counter.get_total_flops())


def measure(models: dict[str, torch.nn.Module], n: int, steps: int, rounds: int) -> dict[str, Any]:
    prompt = torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    samples: dict[str, list[tuple[float, dict[str, float]]]] = defaultdict(list)
    prefills: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for name, model in models.items():  # an untimed round first: tables, caches and allocator warmed alike
        prefill_cost(model, prompt)
        step_times(model, prompt, steps)
    for r in range(rounds):
        for name, model in models.items():
            prefills[name].append(prefill_cost(model, prompt))
            samples[name].append(step_times(model, prompt, steps))
            print(f"prompt {n}, round {r + 1}, {name}: {1e3 * samples[name][-1][0]:.2f} ms/step", flush=True)
    row: dict[str, Any] = {}
    for name in models:
        ops = {op for _, by_op in samples[name] for op in by_op}
        total, by_op = step_flops(models[name], prompt)
        row[name] = {
            "ms_per_step": 1e3 * statistics.median(t for t, _ in samples[name]),
            "op_ms": {op: 1e3 * statistics.median(s.get(op, 0.0) for _, s in samples[name]) for op in ops},
            "flops_per_step": total, "op_flops": by_op,
            "prefill_s": statistics.median(t for t, _ in prefills[name]), "prefill_flops": prefills[name][0][1],
        }
    s, q = row["nope"], row["seqpe"]
    ops = set(s["op_ms"]) | set(q["op_ms"])
    extra = {op: q["op_ms"].get(op, 0.0) - s["op_ms"].get(op, 0.0) for op in ops}
    for name in ("nope", "seqpe"):
        row[name]["prefill_time_vs_stock"] = row[name]["prefill_s"] / row["stock"]["prefill_s"]
        row[name]["prefill_flops_vs_stock"] = row[name]["prefill_flops"] / row["stock"]["prefill_flops"]
        row[name]["time_vs_stock"] = row[name]["ms_per_step"] / row["stock"]["ms_per_step"]
        row[name]["flops_vs_stock"] = row[name]["flops_per_step"] / row["stock"]["flops_per_step"]
    row["time_vs_nope"] = q["ms_per_step"] / s["ms_per_step"]
    row["flops_vs_nope"] = q["flops_per_step"] / s["flops_per_step"]
    row["extra_op_ms"] = dict(sorted(extra.items(), key=lambda kv: -abs(kv[1])))
    row["extra_flops_by_op"] = {op: q["op_flops"].get(op, 0) - s["op_flops"].get(op, 0)
                                for op in set(s["op_flops"]) | set(q["op_flops"])}
    return row


def report(rows: dict[str, dict[str, Any]], steps: int, rounds: int, device: str) -> str:
    lines = [
        f"# SeqPE's cached decoding step vs stock GPT-2: time and FLOPs by operator ({device}, 1 thread; "
        f"{steps} steps × {rounds} rounds, medians)\n",
        "Written by `benchmarks/decode_profile.py` (the models of `benchmarks/decode.py`). Time is the profiler's "
        "self CPU time per step summed over operators (the profiler's own overhead included alike in both); FLOPs "
        "from `torch.utils.flop_counter` (matmuls and attention, a causal mask counted whole; elementwise work counts 0).\n",
        "| prompt | stock ms/step | NoPE ms/step (× stock) | SeqPE ms/step (× stock, × NoPE) | stock MFLOP/step | "
        "NoPE MFLOP/step | SeqPE MFLOP/step (× NoPE) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in rows.items():
        s, o, q = r["stock"], r["nope"], r["seqpe"]
        lines.append(f"| {n} | {s['ms_per_step']:.2f} | {o['ms_per_step']:.2f} ({o['time_vs_stock']:.2f}) | "
                     f"{q['ms_per_step']:.2f} ({q['time_vs_stock']:.2f}, {r['time_vs_nope']:.2f}) | "
                     f"{s['flops_per_step'] / 1e6:.2f} | {o['flops_per_step'] / 1e6:.2f} | "
                     f"{q['flops_per_step'] / 1e6:.2f} ({r['flops_vs_nope']:.2f}) |")
    lines += ["\nThe prefill (the prompt's forward; SeqPE's inference table already built, as in a second `generate`):\n",
              "| prompt | stock s | NoPE s (× stock) | SeqPE s (× stock) | stock GFLOP | NoPE GFLOP | SeqPE GFLOP (× stock) |",
              "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        s, o, q = r["stock"], r["nope"], r["seqpe"]
        lines.append(f"| {n} | {s['prefill_s']:.3f} | {o['prefill_s']:.3f} ({o['prefill_time_vs_stock']:.2f}) | "
                     f"{q['prefill_s']:.3f} ({q['prefill_time_vs_stock']:.2f}) | {s['prefill_flops'] / 1e9:.2f} | "
                     f"{o['prefill_flops'] / 1e9:.2f} | {q['prefill_flops'] / 1e9:.2f} ({q['prefill_flops_vs_stock']:.2f}) |")
    for n, r in rows.items():
        lines += [f"\nPrompt {n}: SeqPE's extra time per step by operator (ms, SeqPE − NoPE through the same "
                  "adapter; the ten largest in size), and its extra FLOPs by operator\n",
                  "| operator | extra ms/step | share of the extra |", "|---|---|---|"]
        total = r["seqpe"]["ms_per_step"] - r["nope"]["ms_per_step"]
        for op, ms in list(r["extra_op_ms"].items())[:10]:
            lines.append(f"| `{op}` | {ms:+.3f} | {100 * ms / total:.0f} % |" if total else f"| `{op}` | {ms:+.3f} | – |")
        flops = ", ".join(f"`{op}` {v / 1e6:+.2f} M" for op, v in sorted(r["extra_flops_by_op"].items()) if v)
        lines.append(f"\nExtra FLOPs per step: {flops or 'none'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=256,
                        help="profiled decoding steps per round (SeqPE's table grows every 256 positions: keep 256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    positions = max(args.prompts) + args.steps + 1
    models = {name: build(name, positions) for name in MODELS}
    rows = {str(n): measure(models, n, args.steps, args.rounds) for n in args.prompts}
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_profile.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "steps": args.steps, "rounds": args.rounds, "prompts": rows},
        indent=1) + "\n")
    text = report(rows, args.steps, args.rounds, device)
    (args.out / "decode_profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

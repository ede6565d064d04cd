"""Speed and memory of one attention layer per position encoding, relative to plain causal SDPA.

Each row times ``pe.prepare`` + ``pe.attend`` forward + backward for one layer (batch ``B``,
``H`` heads of width ``E``, causal, positions 0…L-1), which is an upper bound on the per-layer
cost: a real model pays ``prepare`` (RoPE's cos/sin, ALiBi's bias, SeqPE's table lookup) once
per forward for all its layers. The SeqPE encoder itself is frozen here (eval table), since its
cost is per forward, not per layer; ``W_PE`` trains. ``attn_bias_materialized`` is the naive
reference the concatenation trick must beat: Eq. 14 with the ``[b, h, L, L]`` bias
``e_q·e_kᵀ/√e`` built and handed to SDPA as a float mask (the released code's way).

Peak memory: on CUDA the allocator's peak above the inputs; on CPU the process's peak resident
memory above the inputs, sampled every 0.2 ms from /proc/self/statm while the step runs. glibc
is pinned to mmap every allocation of 64 KiB or more (``MALLOC_MMAP_THRESHOLD_``; the script
re-executes itself with it set), so a freed tensor leaves the resident set at once and the
samples track live tensor bytes (plus kernel scratch, which SDPA's own allocator also uses).

    python benchmarks/attention.py                                   # CPU, smoke model (4 × 32)
    python benchmarks/attention.py --device cuda --dtype bf16 --batch 4 --heads 12 --head-dim 64
"""

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from seqpe_nd.encodings import PositionEncoding, build_position_encoding
from seqpe_nd.positions import load_space

RESULTS = Path(__file__).resolve().parent / "results"
METHODS: dict[str, dict] = {
    "sdpa": {},  # the reference: F.scaled_dot_product_attention(is_causal=True), no PE object
    "nope": {"method": "nope"},
    "ape_sin": {"method": "ape_sin"},
    "ape_learn": {"method": "ape_learn"},
    "rope": {"method": "rope"},
    "rope_axial": {"method": "rope_axial"},
    "rope_mixed": {"method": "rope_mixed"},
    "alibi": {"method": "alibi"},
    "alibi_nd": {"method": "alibi_nd", "distance": "manhattan"},
    "seqpe_input_add": {"method": "seqpe", "integration": "input_add"},
    "seqpe_attn_sum": {"method": "seqpe", "integration": "attn_sum"},
    "seqpe_attn_mul": {"method": "seqpe", "integration": "attn_mul"},
    "seqpe_attn_bias": {"method": "seqpe", "integration": "attn_bias"},
    "attn_bias_materialized": {"method": "seqpe", "integration": "attn_bias"},  # same weights, naive path
}
SEQPE_SMALL = {"hidden": 64, "layers": 1, "heads": 1, "dropout": 0.0, "alpha": 0.0, "beta": 0.0}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled from a thread."""

    def __init__(self, every_s: float = 2e-4) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.every_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def materialized_attn_bias(
    pe: PositionEncoding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Eq. 14 the naive way: a dense float bias ``e_q·e_kᵀ/√e`` plus the causal mask, into SDPA."""
    state = pe.prepare(pos)
    n, e = q.shape[-2], q.shape[-1]
    e_q = pe.heads_pe(state, "q", 0, n)  # (b, h, n, e)
    e_k = pe.heads_pe(state, "k", 0, n)
    bias = (e_q @ e_k.transpose(-1, -2)) / math.sqrt(e)  # (b, h, n, n)
    bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def make_step(name: str, args: argparse.Namespace, n: int) -> tuple[Callable[[], None], list[torch.Tensor]]:
    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b, h, e = args.batch, args.heads, args.head_dim
    q, k, v = (torch.randn(b, h, n, e, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, n, e, device=dev, dtype=dtype)
    pos = torch.arange(n, device=dev).expand(b, n)[..., None]
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)

    if name == "sdpa":

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        return step, [q, k, v]

    cfg = dict(METHODS[name])
    if cfg["method"] == "seqpe":
        cfg.update(SEQPE_SMALL)
    space = load_space({"L": 512, "L_max": max(512, *args.lengths) * 2})
    pe = build_position_encoding(cfg, space=space, num_heads=h, head_dim=e, num_layers=1, d_model=h * e).to(dev)
    if cfg["method"] == "seqpe":
        pe.encoder.requires_grad_(False)
        pe.encoder.eval()  # served from its table: the encoder runs once per forward, not per layer

    def step() -> None:
        with autocast:
            if name == "attn_bias_materialized":
                out = materialized_attn_bias(pe, q, k, v, pos)
            else:
                state = pe.prepare(pos)
                emb = pe.embed(state)
                out = pe.attend(q, k, v, state, 0, causal=True)
                if emb is not None:
                    out = out + emb.sum() * 0  # keep the embedding's backward in the step
        out.backward(grad)

    return step, [q, k, v]


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], inputs: list[torch.Tensor], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    for t in inputs:
        t.grad = None
    return time.perf_counter() - t0


def peak_bytes(step: Callable[[], None], inputs: list[torch.Tensor], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as probe:
            step()
        peak = probe.peak
    for t in inputs:
        t.grad = None
    return peak


def measure(name: str, args: argparse.Namespace, n: int) -> dict:
    """Time ``name`` in rounds alternating with plain causal SDPA, so both see the same machine
    load (this one is shared); best of N for each, as timeit advises."""
    step, inputs = make_step(name, args, n)
    ref, ref_inputs = make_step("sdpa", args, n)
    for _ in range(args.warmup):
        timed(ref, ref_inputs, args.device)
        timed(step, inputs, args.device)
    times: list[float] = []
    ref_times: list[float] = []
    while len(times) < args.repeats or (sum(times) + sum(ref_times) < args.min_time and len(times) < 200):
        ref_times.append(timed(ref, ref_inputs, args.device))
        times.append(timed(step, inputs, args.device))
    peak, ref_peak = peak_bytes(step, inputs, args.device), peak_bytes(ref, ref_inputs, args.device)
    return {
        "ms": 1e3 * min(times),
        "peak_mib": peak / 2**20,
        "sdpa_ms": 1e3 * min(ref_times),
        "sdpa_peak_mib": ref_peak / 2**20,
        "time_ratio": min(times) / min(ref_times),
        "mem_ratio": peak / ref_peak if ref_peak > 0 else float("nan"),
        "repeats": len(times),
    }


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{model}, {torch.get_num_threads()} threads"


def markdown(report: dict) -> str:
    lengths = report["lengths"]
    lines = [
        f"# One attention layer, forward + backward ({report['device']})",
        "",
        f"batch {report['batch']}, {report['heads']} heads × {report['head_dim']}, {report['dtype']}, causal, "
        f"torch {report['torch']}. "
        "Ratios to plain causal SDPA timed in alternating rounds at the same L (the `sdpa` row shows the noise); "
        "absolute numbers (this method) in the last columns. "
        "Each step includes the method's per-forward `prepare` (see the script's docstring).",
        "",
        "| method | "
        + " | ".join(f"time ×, L={n}" for n in lengths)
        + " | "
        + " | ".join(f"peak mem ×, L={n}" for n in lengths)
        + " | "
        + " | ".join(f"ms / MiB, L={n}" for n in lengths)
        + " |",
        "|---|" + "---:|" * (3 * len(lengths)),
    ]
    for name, rows in report["results"].items():
        t = [f"{rows[str(n)]['time_ratio']:.2f}" for n in lengths]
        m = [f"{rows[str(n)]['mem_ratio']:.2f}" for n in lengths]
        a = [f"{rows[str(n)]['ms']:.1f} / {rows[str(n)]['peak_mib']:.0f}" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(t + m + a) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed steps")
    parser.add_argument(
        "--min-time", type=float, default=2.0, help="keep timing until this many seconds are spent (short L)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 1 by default: on a shared, oversubscribed machine OpenMP spin-waits make more threads "
        "slower and noisier",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output stem; default benchmarks/results/attention[_<device>]"
    )
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see the docstring: makes RSS track live tensors
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    methods = ["sdpa", *[m for m in args.methods if m != "sdpa"]]

    results: dict[str, dict] = {}
    for name in methods:
        results[name] = {}
        for n in args.lengths:
            results[name][str(n)] = measure(name, args, n)
            row = results[name][str(n)]
            print(f"{name:24s} L={n:6d} {row['ms']:10.1f} ms {row['peak_mib']:9.1f} MiB", flush=True)
    report = {
        "device": device_name(args.device),
        "dtype": args.dtype,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "lengths": args.lengths,
        "torch": torch.__version__,
        "results": results,
    }
    stem = args.out or RESULTS / ("attention" if args.device == "cpu" else f"attention_{args.device}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

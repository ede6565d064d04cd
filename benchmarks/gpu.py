"""The GPU benchmark, prepared: one command, one JSON and one Markdown table, each target judged.

On a CUDA machine (``python benchmarks/gpu.py``), in bf16:

1. **One attention layer**, forward + backward, per method against plain causal SDPA, at 512, 2048
   and 8192 tokens (batch 4, 12 heads of 64): time, peak memory, and which kernel ran
   (``flash`` / ``efficient`` / ``math`` for SDPA, ``flex`` for FlexAttention).
2. **GPT-2 small training** (12 × 768, 512 tokens, batch 8): tokens/s, MFU and host syncs a step
   (CUDA's sync debug mode) for nope, rope, alibi and seqpe (α = β = 0.1), its regularizers' positions drawn
   on the host before the forward as in the trainer (``pe_draws``); eager and ``torch.compile``d (unless
   ``--no-compile``), with the compiled step's time over the eager one and dynamo's graph breaks.
3. **Evaluation forward at 16K tokens**: time and peak memory per method.
4. **Generation**: tokens/s of greedy ``generate`` (128 new tokens after 1024), stock GPT-2 beside.

Targets (from the speed issue): SeqPE attn_bias ≤ 1.7× plain SDPA at 8K (the authors' materialised
bias measured 21×); ALiBi via FlexAttention ≤ 2.5× SDPA at 8K; SeqPE train step ≤ 1.10× RoPE's on
GPT-2 small at 512; 16K evaluation peak memory ≤ 1.1× plain SDPA's (nope).

``--dry-run`` runs the very same code on the CPU at toy sizes (fp32) in seconds; it is a CI test,
so the script cannot rot before a GPU is lent.

    python benchmarks/gpu.py                    # CUDA: results/gpu_<device>.{json,md}
    python benchmarks/gpu.py --no-compile       # without the compiled training steps (minutes of compilation)
    python benchmarks/gpu.py --dry-run --out /tmp/gpu-dry
"""

import argparse
import contextlib
import json
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd.encodings import build_position_encoding, draws_of
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.backbones.language_model import LMSettings, build_lm
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, dict[str, Any]] = {
    "nope": {"method": "nope"},
    "rope": {"method": "rope"},
    "alibi": {"method": "alibi", "backend": "auto"},
    "seqpe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "alpha": 0.1, "beta": 0.1},
}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
"""Dense bf16 tensor-core peak FLOP/s by device name (for MFU); unknown devices report none."""


@dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    layers: int
    width: int
    model_heads: int
    block: int
    vocab: int
    train_batch: int
    train_steps: int
    eval_length: int
    prompt: int
    new_tokens: int
    repeats: int


FULL = Sizes(lengths=(512, 2048, 8192), batch=4, heads=12, head_dim=64, layers=12, width=768, model_heads=12,
             block=512, vocab=50257, train_batch=8, train_steps=10, eval_length=16384, prompt=1024, new_tokens=128,
             repeats=5)
DRY = Sizes(lengths=(32, 64), batch=2, heads=2, head_dim=16, layers=2, width=32, model_heads=2, block=32, vocab=128,
            train_batch=2, train_steps=2, eval_length=128, prompt=16, new_tokens=4, repeats=1)


class Clock:
    """Wall time and peak memory of a callable on the benchmark's device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        yield out
        if self.device.type == "cuda":
            self.sync()
            out["peak_mib"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def host_syncs(self, fn: Callable[[], Any]) -> int | None:
        """Times one call of ``fn`` makes the host wait for the GPU (CUDA's sync debug mode); None off CUDA."""
        if self.device.type != "cuda":
            return None
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    def time(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
        """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> str:
    """The kernel SDPA dispatches to for these inputs: the first of flash, efficient, math that accepts them."""
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(q[:1, :1], k[:1, :1], v[:1, :1], **kwargs)
            return name
        except RuntimeError:
            continue
    return "none"


# --- 1. one attention layer ---------------------------------------------------------------------------

def attention_layer(s: Sizes, device: torch.device, dtype: torch.dtype, clock: Clock) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for n in s.lengths:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (s.batch, s.heads, n, s.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
        pos = torch.arange(n, device=device).view(1, n, 1).expand(s.batch, n, 1)
        space = load_space({"L": n, "L_max": max(20_000, 2 * n)})
        entry: dict[str, Any] = {}

        def fresh(pe: Any) -> Any:
            with torch.no_grad():
                return pe.prepare(pos)

        def step(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                out = attend()
                out.float().sum().backward()
                for t in (q, k, v):
                    t.grad = None
            return run

        with clock.peak() as mem:
            seconds = clock.time(step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), s.repeats)
        entry["sdpa"] = {"seconds": seconds, **mem, "kernel": sdpa_backend(q, k, v, is_causal=True)}
        for name, cfg in METHODS.items():
            cfg = {**cfg, "alpha": 0.0, "beta": 0.0} if name == "seqpe" else cfg  # the layer alone, not the regularizers
            pe = build_position_encoding(cfg, space=space, num_heads=s.heads, head_dim=s.head_dim, num_layers=1,
                                         d_model=s.heads * s.head_dim).to(device).eval()
            with torch.no_grad():
                state = pe.prepare(pos)  # for the kernel probe; each timed step prepares its own (as a forward does)
            kernel = "flex" if pe.score_mod(state, 0) is not None and pe._use_flex(q, k, v, 0.0) else None
            if kernel is None:
                tq, tk = pe.transform_qk(q.detach(), k.detach(), state, 0)
                kernel = sdpa_backend(tq, tk, torch.cat([v.detach(), v.detach()], -1)[..., : tq.shape[-1]],
                                      is_causal=True)
            with clock.peak() as mem:
                seconds = clock.time(step(lambda pe=pe: pe.attend(q, k, v, fresh(pe), 0, causal=True)), s.repeats)
            entry[name] = {"seconds": seconds, **mem, "kernel": kernel, "ratio": seconds / entry["sdpa"]["seconds"]}
        rows[str(n)] = entry
    return rows


# --- 2. GPT-2 small training ---------------------------------------------------------------------------

def gpt2(s: Sizes, method: str, device: torch.device, length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = LMSettings(n_layer=s.layers, n_head=s.model_heads, n_embd=s.width, block_size=s.block, dropout=0.0)
    space = load_space({"L": s.block, "L_max": max(20_000, length)})
    cfg = {**METHODS[method], "hidden": s.width} if method == "seqpe" else METHODS[method]  # the paper: 768 wide
    return build_lm(settings, cfg, space, vocab_size=s.vocab, eos_id=0).to(device)


def training(s: Sizes, device: torch.device, dtype: torch.dtype, clock: Clock, compile_too: bool) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    for name in METHODS:
        for compiled in (False, True) if compile_too else (False,):
            model = gpt2(s, name, device, s.block).train()
            params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            torch._dynamo.reset()
            counters.clear()
            run = torch.compile(model, backend="aot_eager" if device.type == "cpu" else "inductor") if compiled else model
            gen = torch.Generator(device=device).manual_seed(0)
            host = torch.Generator().manual_seed(0)  # the samplers' generator lives on the host, as in the trainer
            ids = torch.randint(0, s.vocab, (s.train_batch, s.block), device=device, generator=gen)
            pos = torch.arange(s.block, device=device).view(1, -1, 1).expand(s.train_batch, -1, 1)

            def step() -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    draws = draws_of(model, host)  # on the host, before the forward: no generator is traced
                    out = run(input_ids=ids, position_ids=pos, use_cache=False, pe_draws=draws)
                    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                    if out.pe_aux_loss is not None:
                        loss = loss + out.pe_aux_loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            with clock.peak() as mem:
                seconds = clock.time(step, s.train_steps, warmup=3 if compiled else 1)
            syncs = clock.host_syncs(step)
            tokens_per_s = s.train_batch * s.block / seconds
            # PaLM's count: 6 N per token plus attention's 12 · layers · length · width
            flops = (6 * params + 12 * s.layers * s.block * s.width) * tokens_per_s
            rows[name + (" (compiled)" if compiled else "")] = {
                "step_seconds": seconds, "tokens_per_s": tokens_per_s, **mem,
                "mfu": None if peak is None else flops / peak, "params": params, "host_syncs": syncs,
                "graph_breaks": sum(counters["graph_break"].values()) if compiled else None,
            }
    rope = rows["rope"]["step_seconds"]
    for name, r in rows.items():
        r["vs_rope"] = r["step_seconds"] / rope
        r["vs_eager"] = r["step_seconds"] / rows[name.removesuffix(" (compiled)")]["step_seconds"]
    return rows


# --- 3. evaluation at 16K, 4. generation -----------------------------------------------------------------

def evaluation(s: Sizes, device: torch.device, dtype: torch.dtype, clock: Clock) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    n = s.eval_length
    for name in METHODS:
        model = gpt2(s, name, device, n).eval()
        ids = torch.randint(0, s.vocab, (1, n), device=device, generator=torch.Generator(device=device).manual_seed(0))
        pos = torch.arange(n, device=device)[None]

        def forward(model: torch.nn.Module = model) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)

        with clock.peak() as mem:
            seconds = clock.time(forward, max(1, s.repeats // 2))
        rows[name] = {"seconds": seconds, **mem}
        del model
    base = rows["nope"]
    for r in rows.values():
        r["time_vs_nope"] = r["seconds"] / base["seconds"]
        if "peak_mib" in r:
            r["memory_vs_nope"] = r["peak_mib"] / base["peak_mib"]
    return rows


def generation(s: Sizes, device: torch.device, dtype: torch.dtype, clock: Clock) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    total = s.prompt + s.new_tokens
    prompt = torch.randint(1, s.vocab, (1, s.prompt), device=device, generator=torch.Generator(device=device).manual_seed(1))
    models: dict[str, torch.nn.Module] = {}
    cfg = GPT2Config(vocab_size=s.vocab, n_layer=s.layers, n_head=s.model_heads, n_embd=s.width, n_positions=total,
                     bos_token_id=0, eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    models["stock"] = GPT2LMHeadModel(cfg).to(device).eval()
    for name in METHODS:
        models[name] = gpt2(s, name, device, total).eval()
    for name, model in models.items():
        def generate(model: torch.nn.Module = model) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model.generate(prompt, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, do_sample=False,
                               attention_mask=torch.ones_like(prompt))

        seconds = clock.time(generate, max(1, s.repeats // 2))
        rows[name] = {"seconds": seconds, "tokens_per_s": s.new_tokens / seconds}
    for r in rows.values():
        r["time_vs_stock"] = r["seconds"] / rows["stock"]["seconds"]
    return rows


# --- report ------------------------------------------------------------------------------------------------

def targets(result: dict[str, Any], s: Sizes) -> list[dict[str, Any]]:
    longest = str(max(s.lengths))
    att, train, ev = result["attention"][longest], result["training"], result["evaluation"]
    checks = [
        ("SeqPE attn_bias layer ≤ 1.7× SDPA at the longest length", att["seqpe"]["ratio"], 1.7),
        ("ALiBi layer ≤ 2.5× SDPA at the longest length", att["alibi"]["ratio"], 2.5),
        ("SeqPE train step ≤ 1.10× RoPE's", train["seqpe"]["vs_rope"], 1.10),
    ]
    if "memory_vs_nope" in ev["seqpe"]:
        checks += [(f"{m} eval peak memory ≤ 1.1× plain SDPA's", ev[m]["memory_vs_nope"], 1.1) for m in ("rope", "alibi", "seqpe")]
    return [{"target": t, "value": v, "limit": lim, "met": v <= lim} for t, v, lim in checks]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark: {result['device']} ({result['dtype']}{', dry run' if result['dry_run'] else ''})\n"]
    lines += ["## Targets\n", "| target | measured | limit | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']:.2f} | {t['limit']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    lines += ["\n## One attention layer, forward + backward (ratio to causal SDPA; kernel)\n",
              "| tokens | SDPA ms | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for n, e in result["attention"].items():
        cells = [f"{e[m]['ratio']:.2f}× ({e[m]['kernel']})" for m in METHODS]
        lines.append(f"| {n} | {1000 * e['sdpa']['seconds']:.2f} ({e['sdpa']['kernel']}) | " + " | ".join(cells) + " |")
    lines += ["\n## GPT-2 small training step\n",
              "| method | tokens/s | × RoPE | × eager | graph breaks | MFU | peak MiB | host syncs a step |",
              "|---|---|---|---|---|---|---|---|"]
    for m, r in result["training"].items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        syncs = "-" if r["host_syncs"] is None else str(r["host_syncs"])
        breaks = "-" if r.get("graph_breaks") is None else str(r["graph_breaks"])
        lines.append(f"| {m} | {r['tokens_per_s']:,.0f} | {r['vs_rope']:.2f} | {r['vs_eager']:.2f} | {breaks} | {mfu} | "
                     f"{r.get('peak_mib', float('nan')):.0f} | {syncs} |")
    lines += [f"\n## Evaluation forward at {result['sizes']['eval_length']} tokens\n", "| method | seconds | × nope | peak MiB | memory × nope |", "|---|---|---|---|---|"]
    for m, r in result["evaluation"].items():
        lines.append(f"| {m} | {r['seconds']:.3f} | {r['time_vs_nope']:.2f} | {r.get('peak_mib', float('nan')):.0f} | {r.get('memory_vs_nope', float('nan')):.2f} |")
    lines += [f"\n## Generation ({result['sizes']['new_tokens']} tokens after {result['sizes']['prompt']})\n", "| model | tokens/s | time × stock |", "|---|---|---|"]
    for m, r in result["generation"].items():
        lines.append(f"| {m} | {r['tokens_per_s']:.1f} | {r['time_vs_stock']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes (fp32)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the torch.compile'd training step (inductor; aot_eager in a dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; --dry-run runs it on the CPU at toy sizes")
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    sizes = DRY if args.dry_run else FULL
    clock = Clock(device)
    name = "CPU" if args.dry_run else torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"device": name, "dtype": str(dtype).removeprefix("torch."), "dry_run": args.dry_run,
                              "torch": torch.__version__, "host": platform.node(), "sizes": asdict(sizes)}
    for part, run in (("attention", lambda: attention_layer(sizes, device, dtype, clock)),
                      ("training", lambda: training(sizes, device, dtype, clock, args.compile)),
                      ("evaluation", lambda: evaluation(sizes, device, dtype, clock)),
                      ("generation", lambda: generation(sizes, device, dtype, clock))):
        print(f"[{time.perf_counter() - t0:5.0f} s] {part} ...", flush=True)
        result[part] = run()
    result["targets"] = targets(result, sizes)
    result["seconds"] = time.perf_counter() - t0
    stem = "gpu_dry_run" if args.dry_run else "gpu_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    atomic_write_text(args.out / f"{stem}.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()

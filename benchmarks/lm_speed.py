"""Speed of SeqPE in the GPT-2 LM, as ratios to the baselines it replaces (same model, same run).

* training step (forward + backward + AdamW step) of SeqPE with both regularizers (α = β = 0.1,
  the space's sampler sizes) over RoPE's;
* evaluation forward (batch 1, no grad) of SeqPE serving embeddings from its cached table over
  APE-learn's, at the training length and at 16× it.

Models are measured interleaved (one step of each in turn, median over the repeats) so that a
shared machine's load hits them alike. Random tokens: the speed does not depend on the data.

    python benchmarks/lm_speed.py                                  # CPU, the smoke model
    python benchmarks/lm_speed.py --preset gpt2-small --device cuda --dtype bf16 --batch 16
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from seqpe_nd.positions import load_space
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.recipes import lm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = {
    # name: (layers, width, heads, block, vocab, space file, SeqPE encoder width)
    "smoke": (2, 128, 4, 128, 4096, "configs/lm/smoke/text-128.yaml", 128),
    "gpt2-small": (12, 768, 12, 512, 50257, "configs/positions/text-512.yaml", 768),
}


def build(pe: dict, preset: str, device: torch.device) -> torch.nn.Module:
    layers, width, heads, block, vocab, space, _ = PRESETS[preset]
    cfg = lm.LMConfig.parse({
        "task": "lm", "model": {"n_layer": layers, "n_head": heads, "n_embd": width, "block_size": block},
        "space": space, "pe": pe,
    })
    torch.manual_seed(0)
    return lm.build_model(cfg, vocab_size=vocab, eos_id=0).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="smoke")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as training on GPUs")
    parser.add_argument("--batch", type=int, default=8, help="training batch (blocks)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers, width, heads, block, vocab, space_file, hidden = PRESETS[args.preset]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    space = load_space(ROOT / space_file)

    seqpe = {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "hidden": hidden, "alpha": 0.1, "beta": 0.1}
    # --- training step: SeqPE (both regularizers, and none) vs RoPE ---
    models = {
        "seqpe": build(seqpe, args.preset, device).train(),
        "seqpe_no_reg": build({**seqpe, "alpha": 0.0, "beta": 0.0}, args.preset, device).train(),
        "rope": build({"method": "rope"}, args.preset, device).train(),
    }
    for model in models.values():  # as the trainer runs 24 of 25 steps: no pe_cos (it is computed on logging steps)
        model.pe.diagnostics = False
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    host = torch.Generator().manual_seed(0)  # the samplers' generator lives on the host, as in the trainer
    ids = torch.randint(0, vocab, (args.batch, block), device=device, generator=gen)
    pos = torch.arange(block, device=device).view(1, block, 1).expand(args.batch, block, 1)

    def train_step(name: str) -> Callable[[], None]:
        def run() -> None:
            with autocast:
                out = models[name](input_ids=ids, position_ids=pos, use_cache=False, pe_generator=host)
                loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                if out.pe_aux_loss is not None:
                    loss = loss + out.pe_aux_loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return run

    train_t = interleaved({k: train_step(k) for k in models}, args.repeats, args.warmup, device)
    train_flops = {}
    for name in models:  # the same step under the FLOP counter (matrix products), after the timing
        with FlopCounterMode(display=False) as counter:
            train_step(name)()
        train_flops[name] = float(counter.get_total_flops())
    models.clear()  # free the weights and their optimizer state; the closures above keep the (now empty) dicts
    opts.clear()

    # --- evaluation forward: SeqPE (cached table) vs APE-learn, batch 1 ---
    models = {"seqpe": build(seqpe, args.preset, device).eval(), "ape_learn": build({"method": "ape_learn"}, args.preset, device).eval()}
    eval_t: dict[str, dict[str, float]] = {}
    for length in (block, 16 * block):
        x = torch.randint(0, vocab, (1, length), device=device, generator=gen)
        p = torch.arange(length, device=device).view(1, length)

        def forward(name: str, x: torch.Tensor = x, p: torch.Tensor = p) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad(), autocast:
                    models[name](input_ids=x, position_ids=p, use_cache=False)
            return run

        eval_t[str(length)] = interleaved({k: forward(k) for k in models}, max(3, args.repeats // 2), 2, device)

    name = f"lm_speed_{args.preset}_{device.type}"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s) of {os.cpu_count()} cores (shared machine)"
    result = {
        "preset": args.preset, "device": dev_name, "dtype": args.dtype, "batch": args.batch, "block": block,
        "layers": layers, "width": width, "heads": heads, "seqpe_encoder_width": hidden,
        "contrastive": space.contrastive.model_dump(), "ood": space.ood.model_dump(), "torch": torch.__version__,
        "train_step_s": train_t, "train_ratio_seqpe_over_rope": train_t["seqpe"] / train_t["rope"],
        "train_step_flops": train_flops, "train_flop_ratio_seqpe_over_rope": train_flops["seqpe"] / train_flops["rope"],
        "eval_forward_s": eval_t,
        "eval_ratio_seqpe_over_ape_learn": {L: t["seqpe"] / t["ape_learn"] for L, t in eval_t.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    lines = [
        f"# LM speed, {args.preset} model ({layers} layers, width {width}, block {block}) on {dev_name}, {args.dtype}\n",
        "| measurement | SeqPE | baseline | time ratio | FLOP ratio |", "|---|---|---|---|---|",
    ]
    for variant, label in (("seqpe", "α=β=0.1"), ("seqpe_no_reg", "α=β=0, no regularizers")):
        lines.append(
            f"| train step, batch {args.batch} (SeqPE {label} vs RoPE) | {train_t[variant] * 1e3:.1f} ms | "
            f"{train_t['rope'] * 1e3:.1f} ms | {train_t[variant] / train_t['rope']:.2f} | "
            f"{train_flops[variant] / train_flops['rope']:.2f} |"
        )
    for L, t in eval_t.items():
        lines.append(f"| eval forward, batch 1, L = {L} (SeqPE table vs APE-learn) | {t['seqpe'] * 1e3:.1f} ms | {t['ape_learn'] * 1e3:.1f} ms | {t['seqpe'] / t['ape_learn']:.2f} | |")
    lines.append(
        "\nFLOP ratio: forward + backward matrix products (`torch.utils.flop_counter`) of the same steps; norms, "
        "activations, dropout, the optimizer and the regularizers' sampling are not counted. Steps without pe_cos, "
        "as the trainer runs all but its logging steps."
    )
    text = "\n".join(lines) + "\n"
    ckpt.atomic_write_text(args.out / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

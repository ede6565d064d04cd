"""Greedy decoding with the Hugging Face cache: GPT2WithPE with every 1-D method against stock GPT-2.

A random-init 4-layer, 128-wide GPT-2 (4 heads, vocabulary 4096) generates ``--new`` tokens after
prompts of 1K, 4K and 8K random tokens with ``model.generate`` (greedy, the HF ``DynamicCache``).
Stock ``GPT2LMHeadModel`` (SDPA) is the reference; every method runs through the same adapter.
Each method is timed twice more without the transformed-key store (every step transforms every
cached key again, as before it existed), so the store's effect is measured in the same run; SeqPE
(attn_bias, one W_PE) is also timed decoding with widened q/k in every layer, as before its decoding
steps added the position scores as one bias shared by the layers.

Models are timed interleaved (one generate of each in turn, ``--repeats`` rounds, best kept) so
that a shared machine's load hits them alike. One thread by default (``--threads``).

    python benchmarks/decode.py                       # CPU: 1K, 4K, 8K prompts, 128 new tokens
    python benchmarks/decode.py --prompts 1024 --repeats 1 --new 16   # a quick look
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.seqpe import SeqPEEncoding
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAYERS, WIDTH, HEADS, VOCAB = 4, 128, 4, 4096
METHODS: dict[str, dict[str, Any]] = {
    "nope": {"method": "nope"},
    "ape_sin": {"method": "ape_sin"},
    "ape_learn": {"method": "ape_learn"},
    "rope": {"method": "rope"},
    "alibi": {"method": "alibi"},
    "seqpe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "hidden": 128, "layers": 2},
}


def config(positions: int) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, n_positions=positions,
                      bos_token_id=0, eos_token_id=None, pad_token_id=0)


def build(method: str, positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if method == "stock":
        cfg = config(positions)
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg).eval()
    space = load_space({"L": positions, "L_max": max(20_000, positions)})
    pe = build_position_encoding(METHODS[method], space=space, num_heads=HEADS, head_dim=WIDTH // HEADS,
                                 num_layers=LAYERS, d_model=WIDTH)
    return GPT2WithPE(config(positions), pe).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor, new: int, *, store: bool, widened: bool = False) -> float:
    """Seconds of one greedy ``generate`` of ``new`` tokens (with or without the transformed-key store).

    ``widened``: SeqPE attn_bias decodes as before its shared position-score bias, every layer's q and keys
    widened with E^q / E^k (kept in the store, or transformed again each step without it)."""
    original = GPT2WithPE._transformed_keys
    if not store:
        GPT2WithPE._transformed_keys = lambda self, cache, past: None  # type: ignore[method-assign]
    pe = getattr(model, "pe", None)  # stock GPT-2 has none
    seqpe = pe if isinstance(pe, SeqPEEncoding) else None
    if seqpe is not None:
        seqpe.shared_scores = not widened
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))
        seconds = time.perf_counter() - t0
    finally:
        GPT2WithPE._transformed_keys = original  # type: ignore[method-assign]
        if seqpe is not None:
            seqpe.shared_scores = True
    assert out.shape[1] == prompt.shape[1] + new
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--new", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best time of each is kept (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.new < 2:
        parser.error(f"--new {args.new}: at least 2 (the time per token is taken after the first)")
    torch.set_num_threads(args.threads)
    positions = max(args.prompts) + args.new
    models = {name: build(name, positions) for name in ["stock", *METHODS]}
    # (model, key store, SeqPE widened, new tokens): every method with and without the store, and its prompt
    # alone (one new token: the prefill); SeqPE also widened as before its shared position-score bias
    runs = [(name, True, False, args.new) for name in models] + [(name, False, False, args.new) for name in METHODS]
    runs += [("seqpe", True, True, args.new), ("seqpe", False, True, args.new)]
    runs += [(name, True, False, 1) for name in models] + [("seqpe", True, True, 1)]
    rows: dict[str, dict[str, Any]] = {}
    for n in args.prompts:
        prompt = torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        best: dict[tuple[str, bool, bool, int], float] = {}
        for r in range(args.repeats):
            for run in runs:
                name, store, widened, new = run
                s = generate(models[name], prompt, new, store=store, widened=widened)
                best[run] = min(best.get(run, float("inf")), s)
                label = f"{name}{' widened' if widened else ''}{'' if store else ' (no key store)'}"
                print(f"prompt {n}, round {r + 1}: {label}, {new} new {s:.2f} s", flush=True)
        stock, stock_prefill = best[("stock", True, False, args.new)], best[("stock", True, False, 1)]
        stock_token = (stock - stock_prefill) / (args.new - 1)

        def entry(name: str, widened: bool = False) -> dict[str, float]:
            on, off = best[(name, True, widened, args.new)], best[(name, False, widened, args.new)]
            prefill = best[(name, True, widened, 1)]
            token = (on - prefill) / (args.new - 1)  # each further new token: one cached decoding step
            return {"seconds": on, "ratio": on / stock, "no_store_seconds": off, "no_store_ratio": off / stock,
                    "prefill_seconds": prefill, "prefill_ratio": prefill / stock_prefill,
                    "token_seconds": token, "token_ratio": token / stock_token}

        rows[str(n)] = {"stock_seconds": stock, "stock_prefill_seconds": stock_prefill,
                        "stock_token_seconds": stock_token, **{name: entry(name) for name in METHODS},
                        "seqpe_widened": entry("seqpe", widened=True)}
    device = platform.processor() or platform.machine()
    payload = {
        "model": {"layers": LAYERS, "width": WIDTH, "heads": HEADS, "vocab": VOCAB}, "new_tokens": args.new,
        "repeats": args.repeats, "threads": args.threads, "device": f"CPU ({device}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "prompts": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "decode.json", json.dumps(payload, indent=1) + "\n")
    lines = [
        f"# Greedy decoding, {args.new} new tokens, vs stock GPT-2 ({LAYERS} layers, width {WIDTH}; "
        f"{payload['device']}, {args.threads} thread; best of {args.repeats}, interleaved)\n",
        "Ratio of `generate` time to stock GPT2LMHeadModel's (SDPA, same cache); in brackets, the same method "
        "without the transformed-key store (every cached key transformed again each step). `seqpe`: attn_bias "
        "with one W_PE, whose decoding steps add E^q·E^k as one bias shared by the layers (keys stay as they are, "
        "no store); `seqpe widened`: the same model decoding as before that, q and every key widened in each layer.\n",
        "| prompt | stock s | " + " | ".join([*METHODS, "seqpe widened"]) + " |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for n, row in rows.items():
        cells = [f"{row[m]['ratio']:.2f}× ({row[m]['no_store_ratio']:.2f}×)" for m in [*METHODS, "seqpe_widened"]]
        lines.append(f"| {n} | {row['stock_seconds']:.2f} | " + " | ".join(cells) + " |")
    lines += [
        f"\nWhere it goes: the prompt alone (`generate` of one token: the prefill) and each further token (the "
        f"rest over {args.new - 1} cached steps), each × stock's; stock's own times in the first column.\n",
        "| prompt | stock prefill s / token ms | " + " | ".join([*METHODS, "seqpe widened"]) + " |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for n, row in rows.items():
        cells = [f"{row[m]['prefill_ratio']:.2f}× / {row[m]['token_ratio']:.2f}×" for m in [*METHODS, "seqpe_widened"]]
        lines.append(f"| {n} | {row['stock_prefill_seconds']:.2f} / {1e3 * row['stock_token_seconds']:.2f} | "
                     + " | ".join(cells) + " |")
    atomic_write_text(args.out / "decode.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

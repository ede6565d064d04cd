"""The SeqPE encoder's share of an LM training step, counted in FLOPs (no GPU needed).

One training step of the paper's LM run (``configs/lm/paper/seqpe.yaml``: GPT-2 small, 512 tokens,
SeqPE attn_bias with a 2-layer 768-wide encoder, α = β = 0.1, the space's sampler sizes) is run
forward and backward under ``torch.utils.flop_counter.FlopCounterMode``; the FLOPs of modules under
``pe.`` (the encoder on the main positions and on the regularizers' sets, W_PE, the losses) are set
against the whole step's. The backbone's FLOPs grow with the batch and the encoder's do not (it
encodes each distinct position once, and the regularizer sets have a fixed size), so the step is
counted at ``--count-batch`` and the backbone part scaled to the paper's per-GPU batch of 32.
Only matrix products are counted (``FlopCounterMode``): norms, activations, dropout and softmax are not.

    python benchmarks/seqpe_flops.py                      # GPT-2 small (seqpe_flops.md)
    python benchmarks/seqpe_flops.py --config configs/lm/smoke/seqpe.yaml --batch 8 --count-batch 8
                                                          # the CPU smoke model (seqpe_flops_smoke.md)
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from seqpe_nd.encodings import load_pe_config
from seqpe_nd.tasks.recipes import load_config
from seqpe_nd.tasks.recipes.lm import build_model
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


GPT2_VOCAB = 50257


def vocab_of(cfg: Any) -> int:
    """The run's vocabulary: the project's BPE size, else GPT-2's (the paper's tokenizer)."""
    return cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else GPT2_VOCAB


def count(cfg: Any, batch: int) -> float:
    """FLOPs of one training step (forward + backward) of ``cfg``'s model at ``batch``."""
    torch.manual_seed(0)
    vocab = vocab_of(cfg)
    model = build_model(cfg, vocab_size=vocab, eos_id=vocab - 1).train()
    n = cfg.model.block_size
    ids = torch.randint(0, vocab, (batch, n))
    pos = torch.arange(n).view(1, n, 1).expand(batch, n, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=ids, position_ids=pos, use_cache=False, pe_generator=torch.Generator().manual_seed(0))
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if out.pe_aux_loss is not None:
            loss = loss + out.pe_aux_loss
        loss.backward()
    return float(counter.get_total_flops())


def encoder_flops(cfg: Any) -> float:
    """FLOPs of the SeqPE encoder on one step's main positions (0…L-1, shared by every row), forward + backward."""
    torch.manual_seed(0)
    vocab = vocab_of(cfg)
    model = build_model(cfg, vocab_size=vocab, eos_id=vocab - 1).train()
    counter = FlopCounterMode(display=False)
    with counter:
        model.pe.encoder(torch.arange(cfg.model.block_size).view(1, -1, 1)).sum().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "lm" / "paper" / "seqpe.yaml")
    parser.add_argument("--count-batch", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="the batch the share is reported at (paper: 32)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = args.config.resolve()
    cfg = load_config(config)
    default = config == (ROOT / "configs" / "lm" / "paper" / "seqpe.yaml").resolve()
    stem = "seqpe_flops" if default else f"seqpe_flops_{config.parent.name}"
    s = args.batch / args.count_batch
    rope = count(cfg.model_copy(update={"pe": load_pe_config({"method": "rope"})}), args.count_batch)
    plain = count(cfg.model_copy(update={"pe": cfg.pe.model_copy(update={"alpha": 0.0, "beta": 0.0})}), args.count_batch)
    seqpe = count(cfg, args.count_batch)
    encoder = encoder_flops(cfg)
    parts = {  # at the reported batch: what grows with it, and what SeqPE pays once a step
        "backbone (as RoPE)": rope * s,
        "wider q·k and W_PE (attn_bias)": (plain - rope - encoder) * s,
        "encoder on the main positions": encoder,
        "regularizers (L_delta, L_OOD: encoder on their sets, losses)": seqpe - plain,
    }
    total = sum(parts.values())
    result = {
        "config": str(config.relative_to(ROOT)), "vocab": vocab_of(cfg), "count_batch": args.count_batch, "batch": args.batch,
        "counted": {"rope": rope, "seqpe_no_regularizers": plain, "seqpe": seqpe, "encoder_main": encoder},
        "parts_at_batch": parts, "step_at_batch": total,
        "encoder_share": (parts["encoder on the main positions"] + parts["regularizers (L_delta, L_OOD: encoder on their sets, losses)"]) / total,
        "step_vs_rope": total / parts["backbone (as RoPE)"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    unit, scale = ("T", 1e12) if total >= 1e12 else ("G", 1e9)
    shape = f"{cfg.model.n_layer} layers x {cfg.model.n_embd}, {cfg.model.block_size} tokens, vocabulary {vocab_of(cfg)}"
    lines = [f"# SeqPE in an LM training step, in FLOPs (forward + backward; {result['config']}: {shape}; batch {args.batch})\n",
             f"| part | {unit}FLOPs | share of the step |", "|---|---|---|"]
    lines += [f"| {k} | {v / scale:.3f} | {100 * v / total:.1f} % |" for k, v in parts.items()]
    lines += [f"| **step** | {total / scale:.3f} | {result['step_vs_rope']:.3f}× RoPE's |",
              f"\nThe SeqPE encoder (main positions and the regularizers' sets): {100 * result['encoder_share']:.1f} % of the step. "
              f"Counted at batch {args.count_batch}; the backbone and the attention scale with the batch, the encoder's "
              "work does not (each distinct position once, fixed-size regularizer sets). Matrix products only."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / f"{stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()

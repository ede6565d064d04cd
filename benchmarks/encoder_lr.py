"""Why SeqPE's encoder needs its own peak learning rate (``pe.encoder_lr_max``), and what does not replace it.

Part 1, the mechanism, without any task: the LM smoke config's encoder is trained on α·L_δ + β·L_OOD
alone (Adam, 600 steps, the smoke space and encoder) at several learning rates and with each candidate
fix at 3e-3, then L_δ, its chance level and p⁺'s top-1 rate are probed on fresh candidate sets, and the
[CLS] query's attention over the digit slots is read per layer. Part 2, the task: test perplexity of the
GPT-2 and Llama smoke runs at several encoder rates, read from finished run folders (``--lm-runs``:
``<dir>/<case>/compare.json`` written by ``seqpe-nd compare``; cases not run yet are listed as such).
Writes ``benchmarks/results/encoder_lr.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/encoder_lr.py --lm-runs runs/calib     # ~10 min on one CPU thread
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.positions import load_space
from seqpe_nd.regularizers import probe_contrastive
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text
from seqpe_nd.tasks.recipes import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs/lm/smoke/seqpe.yaml"
BIG_BATCH = {"contrastive": {"batch": 32}, "ood": {"num_starts": 32}}
# name: (lr, options); options: warmup steps, Adam betas / eps, frozen parameter names, qk_norm, space update
CASES: dict[str, tuple[float, dict[str, Any]]] = {
    "Adam 3e-4": (3e-4, {}),
    "Adam 1e-3": (1e-3, {}),
    "Adam 3e-3": (3e-3, {}),
    "3e-3, 150 warmup steps": (3e-3, {"warmup": 150}),
    "3e-3, betas (0.9, 0.95)": (3e-3, {"betas": (0.9, 0.95)}),
    "3e-3, eps 1e-4": (3e-3, {"eps": 1e-4}),
    "3e-3, output biases frozen": (3e-3, {"freeze": ("proj.bias", "ln_f.bias")}),
    "3e-3, QK-LayerNorm": (3e-3, {"qk_norm": True}),
    "3e-3, 4x regularizer batches": (3e-3, {"space": BIG_BATCH}),
    "1e-3, QK-LayerNorm": (1e-3, {"qk_norm": True}),
}
LM_CASES = {  # folder under --lm-runs: (backbone, encoder peak lr, label)
    "gpt2-s1.0": ("GPT-2", 2e-3, "encoder at the run's 2e-3 (encoder_lr_max: null)"),
    "gpt2-s0.15": ("GPT-2", 3e-4, "encoder capped at 3e-4 (the default)"),
    "gpt2-s0.1": ("GPT-2", 2e-4, "encoder at 2e-4 (encoder_lr_scale 0.1, before)"),
    "llama-s1.0": ("Llama", 2e-3, "encoder at the run's 2e-3 (encoder_lr_max: null)"),
    "llama-s0.15": ("Llama", 3e-4, "encoder capped at 3e-4 (the default)"),
}


def cls_attention(enc: Any, pos: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer: the [CLS] query's mean attention over the slots (digits…, [CLS]) and its entropy."""
    space = enc.space
    x = enc.tok(space.tokenize(pos)) + enc.slot_embedding()
    out = []
    with torch.no_grad():
        for block in enc.blocks:
            u, s, c = x.shape
            q, k, _ = block.c_attn(block.ln_1(x)).split(c, dim=-1)
            h = block.heads
            q = block.q_norm(q.view(u, s, h, c // h)).transpose(1, 2)
            k = block.k_norm(k.view(u, s, h, c // h)).transpose(1, 2)
            att = (q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)[:, :, 0]  # (u, h, s)
            entropy = float(-(att * att.clamp_min(1e-12).log()).sum(-1).mean())
            out.append({"entropy": entropy, "max_entropy": math.log(s), "mean": att.mean((0, 1)).tolist()})
            x = block(x)
    return out


def run(lr: float, options: dict[str, Any], steps: int) -> dict[str, Any]:
    config = load_config(CONFIG)
    space = config.space
    if "space" in options:
        fields = space.model_dump(mode="json")
        space = load_space({**fields, **{k: {**fields[k], **v} for k, v in options["space"].items()}})
    d, h = config.model.n_embd, config.model.n_head
    torch.manual_seed(0)
    pe_config = {**config.pe.model_dump(), "qk_norm": bool(options.get("qk_norm"))}
    pe = build_position_encoding(pe_config, space=space, num_heads=h, head_dim=d // h, num_layers=1, d_model=d)
    enc, reg = pe.encoder, pe.regularizer
    assert reg is not None
    frozen = options.get("freeze", ())
    params = [p for n, p in enc.named_parameters() if not any(f in n for f in frozen)]
    opt = torch.optim.AdamW(params, lr=lr, betas=options.get("betas", (0.9, 0.999)), eps=options.get("eps", 1e-8),
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    main = space.positions(space.L).unsqueeze(0)
    warmup = options.get("warmup", 0)
    trace = []
    t0 = time.perf_counter()
    enc.train()
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / warmup) if warmup else lr
        out = reg.step(enc, main, g, shifted=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if i % 100 == 0 or i == steps - 1:
            trace.append([i, float(out.parts["loss_delta"])])
    enc.eval()
    probe = probe_contrastive(enc, torch.Generator().manual_seed(1234))
    train_pos = space.positions(space.L)
    with torch.no_grad():
        e = F.normalize(enc(train_pos), dim=-1)
    return {"lr": lr, "l_delta": probe.loss, "chance": probe.chance, "top1": probe.top1,
            "train_cos": float((e @ e.T).mean()), "cls_attention": cls_attention(enc, train_pos),
            "trace": trace, "seconds": time.perf_counter() - t0}


def lm_rows(runs: Path | None) -> list[dict[str, Any]]:
    rows = []
    for folder, (backbone, lr, label) in LM_CASES.items():
        path = None if runs is None else runs / folder / "compare.json"
        row: dict[str, Any] = {"case": folder, "backbone": backbone, "encoder_lr": lr, "label": label}
        if path is not None and path.is_file():
            row["ppl"] = json.loads(path.read_text())["rows"]["seqpe"]["ppl"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--only", nargs="*", default=None,
                        help="case names to run (default all); the others keep the results of the last run")
    parser.add_argument("--lm-runs", type=Path, default=None, help="folder of `seqpe-nd compare` outputs, one per LM case")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    previous = args.results / "encoder_lr.json"  # cases left out with --only keep their last results
    kept = {r["case"]: r for r in json.loads(previous.read_text())["regularizers_alone"]} if previous.is_file() else {}
    rows = []
    for name, (lr, options) in CASES.items():
        if args.only is not None and name not in args.only:
            if name in kept:
                rows.append(kept[name])
            continue
        rows.append({"case": name, **run(lr, options, args.steps)})
        r = rows[-1]
        print(f"{name}: L_δ {r['l_delta']:.3f} (chance {r['chance']:.3f}), top-1 {r['top1']:.1%}, "
              f"[CLS] layer-0 entropy {r['cls_attention'][0]['entropy']:.2f}", flush=True)
    lm = lm_rows(args.lm_runs)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "encoder_lr.json", json.dumps({"steps": args.steps, "regularizers_alone": rows, "lm": lm}, indent=1) + "\n")
    lines = [
        "# SeqPE's encoder learning rate: the mechanism and the default cap (`pe.encoder_lr_max`)\n",
        f"## The encoder alone: {args.steps} Adam steps on α·L_δ + β·L_OOD, no task (LM smoke space and encoder)\n",
        "L_δ and p⁺'s top-1 on 4 × 64 fresh pivots; `train cos`: mean cosine between the training positions' embeddings; "
        "[CLS] entropy: the [CLS] query's attention entropy over its 5 slots (max ln 5 = 1.61), layer 0 / layer 1, "
        "and its weight on itself in layer 0. Produced by `benchmarks/encoder_lr.py`.\n",
        "| case | L_δ | chance | p⁺ top-1 | train cos | [CLS] entropy L0 / L1 | [CLS]→[CLS] L0 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        att = r["cls_attention"]
        lines.append(f"| {r['case']} | {r['l_delta']:.3f} | {r['chance']:.3f} | {r['top1']:.1%} | {r['train_cos']:.4f} | "
                     f"{att[0]['entropy']:.2f} / {att[1]['entropy']:.2f} | {att[0]['mean'][-1]:.2f} |")
    lines += ["", "## The task: smoke LM test perplexity at 128 → 2048 tokens by encoder peak rate (run lr 2e-3, warmup 150, seed 0)\n",
              "| backbone | case | encoder peak lr | 128 | 256 | 512 | 1024 | 2048 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in lm:
        cells = " | ".join(f"{v:.1f}" for v in r["ppl"].values()) if "ppl" in r else "not run | | | |"
        lines.append(f"| {r['backbone']} | {r['label']} | {r['encoder_lr']:.0e} | {cells} |")
    atomic_write_text(args.results / "encoder_lr.md", "\n".join(lines) + "\n")
    print(f"wrote {args.results}/encoder_lr.json and .md")


if __name__ == "__main__":
    main()

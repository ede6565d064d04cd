"""torch.compile graph breaks per position encoding and backbone, against the stock model (issue: compile-clean).

``torch._dynamo.explain`` traces tiny models, nothing is compiled or run on a device: the training forward with
labels (the loss the trainer optimizes, the PE's auxiliary loss included) and the evaluation forward of a GPT-2
and a Llama (1-D methods) and of timm's ViT (2-D methods). As in the trainer, the PE's random inputs (SeqPE's
regularizer positions) are drawn on the host before the forward and passed as ``pe_draws``. Prints a table and
writes JSON.

    python benchmarks/graph_breaks.py                         # results/graph_breaks.{json,md}
    python benchmarks/graph_breaks.py --methods nope rope --out /tmp/gb.json

Run it outside pytest: the tests' runtime type checks (beartype through jaxtyping's import hook) add breaks of
their own; tests/tasks/test_compile_clean.py runs this script in a fresh interpreter.
"""

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch._dynamo as dynamo

RESULTS = Path(__file__).resolve().parent / "results"
METHODS_1D = ("nope", "ape_sin", "ape_learn", "rope", "alibi", "seqpe")
METHODS_2D = ("nope", "ape_sin", "ape_learn", "rope_axial", "rope_mixed", "alibi_nd", "seqpe")
SPACE_1D = {"L": [16], "L_max": [256], "contrastive": {"batch": 4, "num_candidates": 8},
            "ood": {"num_starts": 2, "num_teachers": 8}}
SPACE_2D = {"L": [4, 4], "L_max": [28, 28], "contrastive": {"batch": 4, "num_candidates": 8},
            "ood": {"num_starts": 2, "num_teachers": 8}}


def pe_config(method: str) -> dict[str, Any]:
    return {"method": "seqpe", "layers": 1, "dropout": 0.0} if method == "seqpe" else {"method": method}


def breaks(fn: Any, *args: Any) -> tuple[int, list[str]]:
    """Graph breaks of ``fn(*args)`` and where each happened (``file:line``, in this project where it can)."""
    dynamo.reset()
    try:
        e = dynamo.explain(fn)(*args)
    finally:
        dynamo.reset()
    where = []
    for r in e.break_reasons:
        frames = [f for f in r.user_stack if "site-packages" not in f.filename] or list(r.user_stack)
        f = frames[-1] if frames else None
        where.append(f"{Path(f.filename).name}:{f.lineno}" if f else "?")
    return e.graph_break_count, where


def causal_lms() -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                   bos_token_id=None, eos_token_id=None)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                                                      pad_token_id=None)),
    }


def measure(methods_1d: list[str], methods_2d: list[str]) -> list[dict[str, Any]]:
    from seqpe_nd.encodings import build_position_encoding, draws_of
    from seqpe_nd.tasks.attach import attach_position_encoding, pe_sizes
    from seqpe_nd.tasks.backbones.vit import ViTWithPE, create_vit

    rows: list[dict[str, Any]] = []
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for arch, make in causal_lms().items():
        for method in ["stock", *methods_1d]:
            torch.manual_seed(0)
            model = make()
            if method != "stock":
                pe = build_position_encoding(pe_config(method), space=SPACE_1D, **pe_sizes(model))
                attach_position_encoding(model, pe)
            for mode in ("train", "eval"):
                model.train(mode == "train")
                pe = {} if method == "stock" else {"pe_draws": draws_of(model, torch.Generator().manual_seed(2))}
                n, where = breaks(lambda ids: model(input_ids=ids, labels=ids, use_cache=False, **pe).loss, ids)
                rows.append({"backbone": arch, "method": method, "mode": mode, "breaks": n, "where": where})
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    for method in methods_2d:
        torch.manual_seed(0)
        vit = create_vit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
        model = ViTWithPE.with_pe(vit, pe_config(method), SPACE_2D)
        for mode in ("train", "eval"):
            model.train(mode == "train")
            draws = draws_of(model, torch.Generator().manual_seed(2))
            n, where = breaks(lambda x: (lambda o: o.logits.sum() + (0 if o.pe_aux_loss is None else o.pe_aux_loss))(
                model(x, pe_draws=draws)), x)
            rows.append({"backbone": "vit", "method": method, "mode": mode, "breaks": n, "where": where})
    return rows


def compiled_vs_eager(methods: list[str]) -> list[dict[str, Any]]:
    """GPT-2 with each PE: ``torch.compile`` (backend aot_eager: dynamo's graphs through AOTAutograd, no code
    generation) against eager, logits and loss with labels, training and evaluation; one compilation per mode.
    Training: eager draws the PE's regularizer positions inside the forward from a generator (``pe_generator``),
    the compiled forward gets them drawn ahead from a generator seeded alike (``pe_draws``)."""
    from seqpe_nd.encodings import build_position_encoding, draws_of
    from seqpe_nd.tasks.attach import attach_position_encoding, pe_sizes

    rows: list[dict[str, Any]] = []
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for method in methods:
        torch.manual_seed(0)
        model = causal_lms()["gpt2"]()
        for module in model.modules():  # dropout off: eager and compiled draw no masks of their own
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        cfg = pe_config(method)
        attach_position_encoding(model, build_position_encoding(cfg, space=SPACE_1D, **pe_sizes(model)))

        def forward(ids: torch.Tensor, **pe: Any) -> tuple[torch.Tensor, torch.Tensor]:
            out = model(input_ids=ids, labels=ids, use_cache=False, **pe)
            return out.logits, out.loss

        for mode in ("train", "eval"):
            model.train(mode == "train")
            draws = draws_of(model, torch.Generator().manual_seed(2))
            dynamo.reset()
            try:
                want = forward(ids, pe_generator=torch.Generator().manual_seed(2))
                got = torch.compile(forward, backend="aot_eager")(ids, pe_draws=draws)
            finally:
                dynamo.reset()
            rows.append({"backbone": "gpt2", "method": method, "mode": mode,
                         "logits_max_abs_diff": float((got[0] - want[0]).abs().max()),
                         "loss_abs_diff": float((got[1] - want[1]).abs())})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({(r["backbone"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1] != "stock", k[1]))
    got = {(r["backbone"], r["method"], r["mode"]): r["breaks"] for r in rows}
    lines = ["| backbone | method | train | eval |", "|---|---|---|---|"]
    lines += [f"| {b} | {m} | {got[b, m, 'train']} | {got[b, m, 'eval']} |" for b, m in keys]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (1-D and 2-D lists alike)")
    parser.add_argument("--out", type=Path, default=RESULTS / "graph_breaks.json")
    parser.add_argument("--what", nargs="+", choices=["breaks", "compiled"], default=["breaks", "compiled"],
                        help="graph breaks, and/or compiled == eager (GPT-2)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    pick = (lambda ms: [m for m in ms if m in args.methods]) if args.methods else list
    rows = measure(pick(METHODS_1D), pick(METHODS_2D)) if "breaks" in args.what else []
    compiled = compiled_vs_eager(pick(METHODS_1D)) if "compiled" in args.what else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows, "compiled": compiled}, indent=1) + "\n")
    md = table(rows) if rows else ""
    if compiled:
        md += ("\nCompiled (aot_eager) against eager, GPT-2, largest |difference| of logits / of the loss:\n\n"
               "| method | train | eval |\n|---|---|---|\n")
        got = {(r["method"], r["mode"]): r for r in compiled}
        for m in dict.fromkeys(r["method"] for r in compiled):
            md += "| " + " | ".join([m] + [f"{got[m, x]['logits_max_abs_diff']:.1e} / {got[m, x]['loss_abs_diff']:.1e}"
                                           for x in ("train", "eval")]) + " |\n"
    args.out.with_suffix(".md").write_text("Graph breaks under torch.compile (`torch._dynamo.explain`, tiny models, CPU; "
                                           f"torch {torch.__version__}). Written by `benchmarks/graph_breaks.py`.\n\n" + md)
    print(md, end="")
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""Table 2 of the paper at smoke scale: long-context QA fine-tuned from the LM smoke runs.

For NoPE, APE-learn, RoPE-10⁶, ALiBi and SeqPE, ``configs/qa/smoke/<method>.yaml`` fine-tunes the
LM run ``benchmarks/lm_table1.py`` wrote (``runs/bench-lm-table1/<method>``: a 2-layer, 128-wide
GPT-2 trained at 128 tokens) on the embedded multi-document QA generator at 256 tokens, keeps the
best validation answer perplexity, and evaluates the same test questions at 256, 512, 1024 and 2048
tokens (1×…8×): answer perplexity, EM (gold answer contained, lower-cased) and strict EM.

Methods go in the order their LM runs complete (final checkpoint written). ``--lm-run
METHOD=DIR`` takes a method's LM run from elsewhere (e.g. one trained with the same smoke config);
one still missing after ``--wait-minutes`` is trained here (``configs/lm/smoke/<method>.yaml``,
``--own-lm-steps`` to shorten it). The results name the LM run each model started from.
Results go to ``benchmarks/results/qa_table2.{json,md,png}``; runs to ``runs/bench-qa-table2/``
(rerunning reuses finished runs).

    python benchmarks/qa_table2.py                         # ~25 min on a shared 2-core CPU
    python benchmarks/qa_table2.py --set train.steps=20    # a quick look
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON
from seqpe_nd.tasks.engine.plots import plot_qa
from seqpe_nd.tasks.engine.trainer import train
from seqpe_nd.tasks.recipes import load_config
from seqpe_nd.tasks.recipes.lm import LMRecipe
from seqpe_nd.tasks.recipes.qa import BEST, QARecipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("nope", "ape_learn", "rope-1e6", "alibi", "seqpe")
LABELS = {"nope": "NoPE", "ape_learn": "APE-learn", "rope-1e6": "RoPE-10⁶", "alibi": "ALiBi", "seqpe": "SeqPE"}
BENCH = "bench.json"  # per QA run: timings and provenance, so a rerun can reuse a finished run


def finished(run_dir: Path) -> bool:
    """A training run whose latest checkpoint is at its configured last step."""
    cfg_file, found = run_dir / "config.json", ckpt.latest_checkpoint(run_dir)
    if not cfg_file.is_file() or found is None:
        return False
    steps = json.loads(cfg_file.read_text()).get("train", {}).get("steps")
    return steps is not None and int(json.loads((found / "state.json").read_text())["step"]) >= int(steps)


def describe(lm_run: Path) -> str:
    """Where an LM run lives and how long it trained, for the results."""
    steps = json.loads((lm_run / "config.json").read_text())["train"]["steps"]
    return f"{lm_run.relative_to(ROOT) if lm_run.is_relative_to(ROOT) else lm_run} ({steps} steps)"


def train_own_lm(method: str, run_dir: Path, steps: int | None) -> Path:
    """A LM smoke run of our own (``configs/lm/smoke/<method>.yaml``, optionally shortened)."""
    if not finished(run_dir):
        overrides = [] if steps is None else [f"train.steps={steps}", "train.save_every=0"]
        config = load_config(ROOT / f"configs/lm/smoke/{method}.yaml", overrides)
        print(f"[qa_table2] training our own LM run {run_dir} ({config.train.steps} steps)", flush=True)
        train(LMRecipe.build_task(config, run_dir), config.train, run_dir, resume=run_dir.exists())
    return run_dir


def fine_tuned(run_dir: Path) -> bool:
    """A QA run of an earlier invocation, trained to its end: reused whatever its LM run has become since."""
    return finished(run_dir) and (run_dir / BENCH).is_file() and "lm_source" in json.loads((run_dir / BENCH).read_text())


def next_ready(pending: list[str], lm_dirs: dict[str, Path], runs: Path, deadline: float) -> tuple[str, Path | None]:
    """The first pending method already fine-tuned or whose LM run is complete (waiting until ``deadline``),
    else the first one and None."""
    while True:
        for method in pending:
            if fine_tuned(runs / method) or finished(lm_dirs[method]):
                return method, lm_dirs[method]
        if time.time() >= deadline:
            return pending[0], None
        time.sleep(20)


def run_method(method: str, init: Path, runs: Path, overrides: list[str]) -> dict[str, Any]:
    """Fine-tune (unless already done), then evaluate; returns the eval result with timings."""
    run_dir = runs / method
    config = load_config(ROOT / f"configs/qa/smoke/{method}.yaml", [f"init_from={init}", *overrides])
    bench_file = run_dir / BENCH
    if finished(run_dir) and bench_file.is_file():
        bench = json.loads(bench_file.read_text())
    else:
        task = QARecipe.build_task(config, run_dir)
        model = task.build_model().eval()
        with torch.no_grad():
            init_ppl = task.validate(model)["answer_ppl"]  # before fine-tuning (the LM alone)
        del model
        t = time.perf_counter()
        result = train(task, task.cfg.train, run_dir, resume=run_dir.exists())
        bench = {"train_seconds": time.perf_counter() - t, "val_answer_ppl_init": init_ppl,
                 "val_answer_ppl_last": result.get("val/answer_ppl"), "init_from": str(init), "lm_source": describe(init)}
        best = ckpt.latest_checkpoint(run_dir / BEST)
        if best is not None:
            state = json.loads((best / "state.json").read_text())
            bench.update({"val_answer_ppl_best": state["val_answer_ppl"], "best_step": state["step"]})
        ckpt.atomic_write_text(bench_file, json.dumps(bench, indent=1) + "\n")
    if "eval_seconds" in bench and (run_dir / EVAL_JSON).is_file():  # a rerun: this run was evaluated already
        return {**json.loads((run_dir / EVAL_JSON).read_text()), **bench}
    t = time.perf_counter()
    res = QARecipe.evaluate(run_dir, quiet=False)
    bench["eval_seconds"] = time.perf_counter() - t
    ckpt.atomic_write_text(bench_file, json.dumps(bench, indent=1) + "\n")
    return {**res, **bench}


def fmt_ppl(x: float) -> str:
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown(rows: dict[str, dict[str, Any]], lengths: list[int]) -> tuple[str, str]:
    head = ["model", *(f"{L}" for L in lengths), "AVG.", "train s", "eval s"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m, r in rows.items():
        cells = [f"{r['lengths'][str(L)]['ppl']:.2f} / {r['lengths'][str(L)]['em']:.1f}" for L in lengths]
        ppl = sum(r["lengths"][str(L)]["ppl"] for L in lengths) / len(lengths)
        em = sum(r["lengths"][str(L)]["em"] for L in lengths) / len(lengths)
        out.append("| " + " | ".join([LABELS.get(m, m), *cells, f"{fmt_ppl(ppl)} / {em:.1f}",
                                      f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]) + " |")
    strict = ["| model | " + " | ".join(map(str, lengths)) + " | val PPL: LM → best (step) | LM run |",
              "|" + "|".join("---" for _ in range(len(lengths) + 3)) + "|"]
    for m, r in rows.items():
        cells = [f"{r['lengths'][str(L)]['strict_em']:.1f}" for L in lengths]
        best = r.get("val_answer_ppl_best")
        trace = f"{r['val_answer_ppl_init']:.1f} → {best:.2f} ({r.get('best_step')})" if best is not None else "-"
        strict.append("| " + " | ".join([LABELS.get(m, m), *cells, trace, r["lm_source"]]) + " |")
    return "\n".join(out) + "\n", "\n".join(strict) + "\n"


def plot(rows: dict[str, dict[str, Any]], context_length: int) -> None:
    plot_qa({LABELS.get(m, m): r["lengths"] for m, r in rows.items()}, RESULTS / "qa_table2.png",
               title=f"Table 2 at smoke scale: QA vs context length (fine-tuned at {context_length})",
               train_length=context_length)


def replot() -> None:
    saved = json.loads((RESULTS / "qa_table2.json").read_text())
    plot(saved["runs"], saved["setup"]["context_length"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lm-runs", type=Path, default=ROOT / "runs/bench-lm-table1", help="where benchmarks/lm_table1.py writes its runs")
    parser.add_argument("--lm-run", action="append", default=[], metavar="METHOD=DIR",
                        help="take this method's LM run from DIR instead (e.g. one trained with the same smoke config)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/bench-qa-table2")
    parser.add_argument("--wait-minutes", type=float, default=50.0, help="how long to wait for LM runs to complete, in total")
    parser.add_argument("--own-lm-steps", type=int, default=None,
                        help="after the wait: train missing LM runs ourselves with this many steps (default: the smoke config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--replot", action="store_true", help="only redraw qa_table2.png from qa_table2.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.replot:
        replot()
        return

    t0 = time.perf_counter()
    deadline = time.time() + 60 * args.wait_minutes
    lm_dirs = {m: args.lm_runs / m for m in args.methods}
    for item in args.lm_run:
        method, _, path = item.partition("=")
        if method not in lm_dirs or not path:
            raise ValueError(f"--lm-run {item!r}: expected METHOD=DIR with METHOD one of {list(lm_dirs)}")
        lm_dirs[method] = Path(path).resolve()
    rows: dict[str, dict[str, Any]] = {}
    pending = list(args.methods)
    while pending:  # whichever LM run is complete first goes first
        method, init = next_ready(pending, lm_dirs, args.runs, deadline)
        if init is None:
            init = train_own_lm(method, args.runs / "lm" / method, args.own_lm_steps)
        pending.remove(method)
        print(f"[qa_table2] {method}: fine-tuning from {init}", flush=True)
        rows[method] = run_method(method, init, args.runs, args.overrides)
    rows = {m: rows[m] for m in args.methods}
    wall = time.perf_counter() - t0

    first = next(iter(rows.values()))
    lengths = sorted(int(k) for k in first["lengths"])
    L = first["context_length"]
    base = load_config(ROOT / f"configs/qa/smoke/{args.methods[0]}.yaml", args.overrides)
    setup = {
        "configs": [f"configs/qa/smoke/{m}.yaml" for m in args.methods], "overrides": args.overrides,
        "steps": base.train.steps, "batch_size": base.train.batch_size, "context_length": L, "lengths": lengths,
        "questions_per_length": base.eval.num_examples, "split": base.eval.split, "data": base.data.source,
        "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "wall_seconds": wall,
        "run_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in rows.values()),
    }
    summary = {m: {"lm_source": r["lm_source"], "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"],
                   "val_answer_ppl_init": r["val_answer_ppl_init"], "val_answer_ppl_best": r.get("val_answer_ppl_best"),
                   **{str(x): {k: r["lengths"][str(x)][k] for k in ("ppl", "em", "strict_em", "examples", "mean_docs", "mean_tokens")}
                      for x in lengths}} for m, r in rows.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(RESULTS / "qa_table2.json", json.dumps({"setup": setup, "table2": summary, "runs": rows}, indent=1) + "\n")
    table, strict = markdown(rows, lengths)
    total = sum(r["train_seconds"] + r["eval_seconds"] for r in rows.values())
    text = (
        f"# Table 2 at smoke scale: long-context QA ({base.data.source} multi-document QA generator)\n\n"
        f"Each model is the LM smoke run of its method (2-layer, 128-wide GPT-2 trained at 128 tokens), fine-tuned "
        f"{base.train.steps} steps × {base.train.batch_size} prompts of ≤ {L} tokens (Fig. 4 template, gold document + "
        f"distractors, loss on answer + EOS only), best checkpoint by validation answer perplexity; evaluated on the same "
        f"{base.eval.num_examples} {base.eval.split} questions at each length. Cells: answer perplexity / EM % "
        f"(the paper's EM: gold answer contained in the lower-cased 16-token greedy generation). "
        f"Times in seconds with {args.threads} torch thread(s) on a shared {os.cpu_count()}-core CPU (other jobs "
        f"running, so only roughly comparable); fine-tuning + evaluation of all five: {total / 60:.1f} min "
        f"(this invocation {wall / 60:.1f} min; finished runs are reused with their recorded times).\n\n"
        f"## Perplexity / EM\n\n{table}\n"
        f"## Strict EM % (generation up to EOS, stripped, equals the answer) and fine-tuning\n\n{strict}"
    )
    ckpt.atomic_write_text(RESULTS / "qa_table2.md", text)
    plot(rows, L)
    print(text)


if __name__ == "__main__":
    main()

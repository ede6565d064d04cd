"""Table 2 of the paper at smoke scale: long-context QA fine-tuned from the LM smoke runs, over seeds.

For NoPE, APE-learn, RoPE-10⁶, ALiBi and SeqPE and each seed S, ``configs/qa/smoke/<method>.yaml``
fine-tunes the LM run ``benchmarks/lm_table1.py`` wrote for that seed
(``runs/bench-lm-table1/seed<S>/<method>``: a 2-layer, 128-wide GPT-2 trained at 128 tokens) on the
embedded multi-document QA generator at 256 tokens (``--set train.seed=S``), keeps the best
validation answer perplexity, and asks the same test questions at 256, 512, 1024 and 2048 tokens
(1×…8×): answer perplexity, EM (gold answer contained in the lower-cased generation) and strict EM.
Answers are one of a closed set of single-token colours, so two reference rows say what a score
means: ``chance`` (a uniform guess from the set) and ``copy`` (the answer of a uniformly drawn
document of the prompt, measured on the questions asked).

An LM run that is missing is trained here first with its smoke config and seed. Results go to
``benchmarks/results/qa_table2.{json,md,png}``; runs to ``runs/bench-qa-table2/seed<S>/<method>``
(a rerun reuses finished runs with their recorded times, so an interrupted benchmark resumes).

    python benchmarks/qa_table2.py --jobs 2                        # all methods, seeds 0 1 2
    python benchmarks/qa_table2.py --methods rope-1e6 alibi --seeds 0   # the pilot
"""

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON, mean_std
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
METRICS = ("em", "strict_em", "ppl")
FACTS = {  # data.distractor_facts
    "other": "the gold one \"The colour of the <key> is <colour>.\", each distractor the size or texture of its key, "
             "so the one colour fact is the gold document's",
    "same": "\"The colour of the <key> is <colour>.\" in every document, so only the key asked about tells the gold "
            "document apart",
}
FORMS = {  # data.answer_form
    "value": "the answer is the colour alone",
    "sentence": "the answer restates the fact (\"The colour of the <key> is <colour>.\")",
}


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


def ensure_lm(method: str, seed: int, run_dir: Path, overrides: list[str]) -> Path:
    """The LM smoke run of ``method`` and ``seed``, trained here (with ``overrides``) if it is not complete."""
    if not finished(run_dir):
        config = load_config(ROOT / f"configs/lm/smoke/{method}.yaml", [*overrides, f"train.seed={seed}"])
        print(f"[qa_table2] training the LM run {run_dir} first ({config.train.steps} steps)", flush=True)
        train(LMRecipe.build_task(config, run_dir), config.train, run_dir, resume=run_dir.exists())
    return run_dir


def run_method(
    method: str, seed: int, lm_runs: Path, runs: Path, overrides: list[str], lm_overrides: list[str], threads: int
) -> dict[str, Any]:
    """Fine-tune one method at one seed (unless already done), then evaluate; the eval result with timings."""
    torch.set_num_threads(threads)
    init = ensure_lm(method, seed, lm_runs / f"seed{seed}" / method, lm_overrides)
    run_dir = runs / f"seed{seed}" / method
    config = load_config(ROOT / f"configs/qa/smoke/{method}.yaml",
                         [f"init_from={init}", f"train.seed={seed}", *overrides])
    bench_file = run_dir / BENCH
    if finished(run_dir) and bench_file.is_file():
        bench = json.loads(bench_file.read_text())
    else:
        print(f"[qa_table2] {method} seed {seed}: fine-tuning from {init}", flush=True)
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
    res = QARecipe.evaluate(run_dir, quiet=True)
    bench["eval_seconds"] = time.perf_counter() - t
    ckpt.atomic_write_text(bench_file, json.dumps(bench, indent=1) + "\n")
    print(f"[qa_table2] {method} seed {seed}: EM " + ", ".join(
        f"{n}: {r['em']:.1f}" for n, r in res["lengths"].items()), flush=True)
    return {**res, **bench}


def summarize(per_seed: dict[int, dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Mean ± std over seeds of each metric at each length, and the run times."""
    out: dict[str, Any] = {}
    for n in map(str, lengths):
        cell = {}
        for key in METRICS:
            mean, std = mean_std([r["lengths"][n][key] for r in per_seed.values()])
            cell[key], cell[f"{key}_std"] = mean, std or 0.0  # one seed: no spread
        out[n] = cell
    runs = list(per_seed.values())
    return {"lengths": out, "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "eval_seconds": statistics.fmean(r["eval_seconds"] for r in runs),
            "best_step": [r.get("best_step") for r in runs]}


def baselines(results: dict[str, dict[int, dict[str, Any]]], lengths: list[int]) -> dict[str, dict[str, float]]:
    """Chance and copy-a-document EM per length (copy: mean over every run's questions)."""
    rows = [r["lengths"] for per_seed in results.values() for r in per_seed.values()]
    out: dict[str, dict[str, float]] = {}
    for name, key in (("chance", "chance"), ("copy a random document's answer", "copy_baseline")):
        values = {str(n): [row[str(n)].get(key) for row in rows] for n in lengths}
        if all(v is not None for vs in values.values() for v in vs):
            out[name] = {n: statistics.fmean(vs) for n, vs in values.items()}
    return out


def markdown(rows: dict[str, dict[str, Any]], refs: dict[str, dict[str, float]], lengths: list[int]) -> str:
    def cell(c: dict[str, float], key: str, digits: int) -> str:
        return f"{c[key]:.{digits}f} ± {c[key + '_std']:.{digits}f}"

    out = []
    for title, key, digits in (("EM % (gold answer contained in the 16-token generation)", "em", 1),
                               ("Strict EM % (generation up to EOS equals the answer)", "strict_em", 1),
                               ("Answer perplexity (answer token + EOS)", "ppl", 2)):
        head = ["model", *map(str, lengths), "avg"] + (["train s", "eval s"] if key == "em" else [])
        lines = [f"### {title}\n", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        if key in ("em", "strict_em"):
            for name, levels in refs.items():
                vals = [levels[str(n)] for n in lengths]
                lines.append("| " + " | ".join([f"*{name}*", *(f"{v:.1f}" for v in vals), f"{statistics.fmean(vals):.1f}"]
                                               + ([""] * 2 if key == "em" else [])) + " |")
        for m, r in rows.items():
            cells = [cell(r["lengths"][str(n)], key, digits) for n in lengths]
            avg = statistics.fmean(r["lengths"][str(n)][key] for n in lengths)
            extra = [f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"] if key == "em" else []
            lines.append("| " + " | ".join([LABELS.get(m, m), *cells, f"{avg:.{digits}f}", *extra]) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S")
    parser.add_argument("--lm-runs", type=Path, default=ROOT / "runs/bench-lm-table1",
                        help="where benchmarks/lm_table1.py writes its runs (seed<S>/<method>)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/bench-qa-table2")
    parser.add_argument("--name", default="qa_table2", help="stem of the result files")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, Markdown and PNG go")
    parser.add_argument("--lm-set", dest="lm_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for LM runs this benchmark has to train itself")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process and one thread each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1: the machine is shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    t0 = time.perf_counter()
    keys = [(m, s) for s in args.seeds for m in args.methods]
    call = [(m, s, args.lm_runs, args.runs, args.overrides, args.lm_overrides, args.threads) for m, s in keys]
    if args.jobs == 1:
        done = [run_method(*c) for c in call]
    else:  # spawn: a forked torch process can deadlock in its thread pool
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_method, *zip(*call)))
    wall = time.perf_counter() - t0
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    for (m, s), r in zip(keys, done):
        results[m][s] = r

    first = done[0]
    lengths = sorted(int(k) for k in first["lengths"])
    L = first["context_length"]
    rows = {m: summarize(per_seed, lengths) for m, per_seed in results.items()}
    refs = baselines(results, lengths)
    base = load_config(ROOT / f"configs/qa/smoke/{args.methods[0]}.yaml", args.overrides)
    seeds = ", ".join(map(str, args.seeds))
    run_seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in done)
    setup = {
        "configs": [f"configs/qa/smoke/{m}.yaml" for m in args.methods], "overrides": args.overrides,
        "seeds": args.seeds, "steps": base.train.steps, "batch_size": base.train.batch_size, "context_length": L,
        "lengths": lengths, "questions_per_length": base.eval.num_examples, "split": base.eval.split,
        "data": base.data.model_dump(mode="json"), "torch_threads": args.threads, "jobs": args.jobs,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "wall_seconds": wall, "run_seconds": run_seconds,
    }
    docs = {n: statistics.fmean(r["lengths"][str(n)]["mean_docs"] for r in done) for n in lengths}
    slim = {m: {str(s): r for s, r in per_seed.items()} for m, per_seed in results.items()}
    payload = {"setup": setup, "table2": rows, "baselines": refs, "mean_docs": docs, "runs": slim}
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / f"{args.name}.json", json.dumps(payload, indent=1) + "\n")
    best_steps = "; ".join(f"{LABELS.get(m, m)} {r['best_step']}" for m, r in rows.items())
    text = (
        f"# Table 2 at smoke scale: long-context QA (embedded multi-document QA, closed single-token answers)\n\n"
        f"Each model is the LM smoke run of its method and seed (2-layer, 128-wide GPT-2 trained at 128 tokens, "
        f"`benchmarks/lm_table1.py`), fine-tuned {base.train.steps} steps × {base.train.batch_size} prompts of ≤ {L} "
        f"tokens (Fig. 4 template, gold document among distractors, each document with one planted fact about its own "
        f"key: {FACTS[base.data.distractor_facts]}; {FORMS[base.data.answer_form]}; loss on the answer + EOS only), best "
        f"checkpoint by "
        f"validation answer perplexity (best steps per seed: {best_steps}). Evaluated on the same "
        f"{base.eval.num_examples} {base.eval.split} questions at each length (documents per prompt: "
        + ", ".join(f"{docs[n]:.1f} at {n}" for n in lengths) + "). "
        f"Cells: mean ± std over seeds {seeds} (sample std). Reference rows: *chance* is a uniform guess among the "
        f"colours; *copy* is the answer of a uniformly drawn document of the prompt. Times in seconds (mean per run), "
        f"{args.jobs} run(s) at a time with {args.threads} torch thread(s) on a {os.cpu_count()}-core CPU; all runs "
        f"{run_seconds / 60:.1f} min (this invocation {wall / 60:.1f} min; finished runs are reused with their "
        f"recorded times). Every seed's numbers are in `{args.name}.json`.\n\n"
        + markdown(rows, refs, lengths)
    )
    ckpt.atomic_write_text(out / f"{args.name}.md", text)
    plot_qa({LABELS.get(m, m): r["lengths"] for m, r in rows.items()}, out / f"{args.name}.png",
            title=f"Table 2 at smoke scale: QA vs context length (fine-tuned at {L}), mean ± std over seeds {seeds}",
            train_length=L, baselines=refs)
    print(text)


if __name__ == "__main__":
    main()

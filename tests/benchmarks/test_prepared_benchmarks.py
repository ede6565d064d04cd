"""The prepared benchmarks run end to end at toy sizes, so they cannot rot before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqpe_nd.tasks.engine.evaluation import fmt

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path: Path) -> None:
    run("gpu.py", "--dry-run", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert result["dry_run"] and result["device"] == "CPU"
    assert set(result["attention"]) == {"32", "64"}
    for row in result["attention"].values():
        assert row["sdpa"]["kernel"] in ("flash", "efficient", "math")
        assert {"nope", "rope", "alibi", "seqpe"} <= set(row) and all(row[m]["seconds"] > 0 for m in ("rope", "seqpe"))
    methods = {"nope", "rope", "alibi", "seqpe"}
    assert methods == set(result["evaluation"]) and set(result["training"]) == methods | {f"{m} (compiled)" for m in methods}
    assert all(result["training"][f"{m} (compiled)"]["graph_breaks"] == 0 for m in methods)  # the first GPU run reports it
    assert all(r["vs_eager"] > 0 for r in result["training"].values())
    assert {"stock", "seqpe"} <= set(result["generation"])
    assert len(result["targets"]) >= 3 and all("met" in t for t in result["targets"])
    assert "## Targets" in (tmp_path / "gpu_dry_run.md").read_text()


@pytest.mark.slow
def test_compile_speed_benchmark_runs(tmp_path: Path) -> None:
    run("compile_speed.py", "--configs", "configs/video/smoke/seqpe.yaml", "--steps", "1", "--warmup", "1",
        "--backend", "aot_eager", "--out", str(tmp_path / "cs.json"))
    (row,) = json.loads((tmp_path / "cs.json").read_text())["rows"]
    assert row["task"] == "video" and row["method"] == "seqpe" and row["graph_breaks"] == 0
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and "| video | seqpe |" in (tmp_path / "cs.md").read_text()


@pytest.mark.slow
def test_decode_profile_benchmark_runs(tmp_path: Path) -> None:
    run("decode_profile.py", "--prompts", "32", "--steps", "2", "--rounds", "1", "--out", str(tmp_path))
    row = json.loads((tmp_path / "decode_profile.json").read_text())["prompts"]["32"]
    assert row["seqpe"]["flops_per_step"] > row["nope"]["flops_per_step"] == row["stock"]["flops_per_step"] > 0
    assert row["seqpe"]["prefill_flops"] > row["nope"]["prefill_flops"] > 0 and row["extra_op_ms"]


@pytest.mark.slow
def test_decode_benchmark_runs(tmp_path: Path) -> None:
    run("decode.py", "--prompts", "24", "--new", "3", "--repeats", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "decode.json").read_text())
    row = result["prompts"]["24"]
    assert row["stock_seconds"] > 0 and {"rope", "seqpe", "alibi", "seqpe_widened"} <= set(row)
    assert row["seqpe"]["prefill_seconds"] > 0 and row["seqpe"]["token_ratio"] > 0
    assert "| 24 |" in (tmp_path / "decode.md").read_text()


@pytest.mark.slow
def test_lm_speed_benchmark_runs(tmp_path: Path) -> None:
    run("lm_speed.py", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_speed_smoke_cpu.json", "lm_speed_smoke_cpu.md"]
    result = json.loads((tmp_path / "lm_speed_smoke_cpu.json").read_text())
    assert set(result["train_step_s"]) == set(result["train_step_flops"]) == {"seqpe", "seqpe_no_reg", "rope"}
    assert result["train_flop_ratio_seqpe_over_rope"] > 1
    table = (tmp_path / "lm_speed_smoke_cpu.md").read_text()
    assert "no regularizers vs RoPE" in table and "L = 2048" in table


@pytest.mark.slow
def test_seqpe_flops_benchmark_runs_on_the_smoke_config(tmp_path: Path) -> None:
    run("seqpe_flops.py", "--config", "configs/lm/smoke/seqpe.yaml", "--batch", "8", "--count-batch", "2",
        "--out", str(tmp_path))
    result = json.loads((tmp_path / "seqpe_flops_smoke.json").read_text())
    assert result["vocab"] == 4096 and 0 < result["encoder_share"] < 1 and result["step_vs_rope"] > 1
    assert "GFLOPs" in (tmp_path / "seqpe_flops_smoke.md").read_text()


def naive_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


@pytest.mark.slow
def test_lm_table1_over_seeds_runs(tmp_path: Path) -> None:
    """Two seeds x two methods at toy size: run folders per seed, mean ± std cells that match the seeds' numbers."""
    run("lm_table1.py", "--methods", "rope", "gpt2_stock", "--seeds", "0", "1", "--jobs", "2", "--set", "train.steps=2",
        "--set", "train.batch_size=2", "--set", "eval.lengths=[128,256]", "--set", "eval.max_tokens=512",
        "--name", "toy", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy.json", "toy.md", "toy.png"]
    assert all((tmp_path / "runs" / f"seed{s}" / m / "eval.json").is_file() for s in (0, 1) for m in ("rope", "gpt2_stock"))
    result = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert result["setup"]["seeds"] == [0, 1] and list(result["table1"]) == ["rope", "gpt2_stock"] and not result["table4"]
    for method, row in result["table1"].items():
        for length in ("128", "256"):
            per_seed = [result["runs"][s][method]["lengths"][length]["ppl"] for s in ("0", "1")]
            mean, std = naive_mean_std(per_seed)
            assert row["ppl"][length] == pytest.approx(mean) and row["std"][length] == pytest.approx(std)
        assert per_seed[0] != per_seed[1]  # the seed reached the run
    table = (tmp_path / "out" / "toy.md").read_text()
    assert "std % at 128" in table and "mean ± std over seeds 0, 1" in table
    assert f"| gpt2_stock | {fmt(result['table1']['gpt2_stock']['ppl']['128'])} ± " in table


@pytest.mark.slow
def test_vit_table3_over_seeds_runs(tmp_path: Path) -> None:
    run("vit_table3.py", "--only", "nope", "ape_learn", "--seeds", "0", "1", "--set", "train.steps=2",
        "--set", "eval.resolutions=[24,48]", "--max-images", "16", "--speed-steps", "1",
        "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert all((tmp_path / "runs" / f"seed{s}" / m / "eval.json").is_file() for s in (0, 1) for m in ("nope", "ape_learn"))
    result = json.loads((tmp_path / "out" / "vit_table3.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["speed"]) == {"nope", "ape_learn"}
    for method, row in result["table3"].items():
        for size in ("24", "48"):
            mean, std = naive_mean_std([result["runs"][s][method]["eval"]["resolutions"][size]["top1"] for s in ("0", "1")])
            assert row["top1"][size] == pytest.approx(mean) and row["std"][size] == pytest.approx(std)
        assert result["runs"]["0"][method]["final_train_loss"] != result["runs"]["1"][method]["final_train_loss"]
    table = (tmp_path / "out" / "vit_table3.md").read_text()
    assert "std % at 24" in table and " ± " in table and (tmp_path / "out" / "vit_table3.png").is_file()


@pytest.mark.slow
def test_encoder_lr_benchmark_runs(tmp_path: Path) -> None:
    """Two cases at 3 steps (one with QK-LayerNorm, the option the script patches in); the LM part reads
    `seqpe-nd compare` outputs and lists the cases not run."""
    lm_runs = tmp_path / "lm"
    (lm_runs / "gpt2-s0.15").mkdir(parents=True)
    ppl = {"128": 95.0, "2048": 100.0}
    (lm_runs / "gpt2-s0.15" / "compare.json").write_text(json.dumps({"rows": {"seqpe": {"ppl": ppl}}}))
    run("encoder_lr.py", "--steps", "3", "--only", "Adam 3e-4", "3e-3, QK-LayerNorm", "--lm-runs", str(lm_runs),
        "--results", str(tmp_path))
    result = json.loads((tmp_path / "encoder_lr.json").read_text())
    rows = {r["case"]: r for r in result["regularizers_alone"]}
    assert set(rows) == {"Adam 3e-4", "3e-3, QK-LayerNorm"}
    for r in rows.values():
        assert 0 < r["l_delta"] and 0 < r["chance"] and len(r["cls_attention"]) == 2
        assert abs(sum(r["cls_attention"][0]["mean"]) - 1) < 1e-5  # [CLS]'s attention over its slots sums to 1
    lm = {r["case"]: r for r in result["lm"]}
    assert lm["gpt2-s0.15"]["ppl"] == ppl and "ppl" not in lm["gpt2-s1.0"]
    text = (tmp_path / "encoder_lr.md").read_text()
    assert "| 95.0 | 100.0 |" in text and "not run" in text


def test_collapse_signal_replays_the_trainers_warning(tmp_path: Path) -> None:
    """A run whose pe_spread stays low after warmup and a third of the run is warned where the trainer would;
    a shifted step's record (no pe_spread) neither counts nor resets."""
    def fake_run(name: str, spread: float) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"pe": {"encoder_lr_max": 3e-4}, "train": {
            "lr": 2e-3, "warmup_steps": 10, "steps": 90}}))
        lines = [{"step": s, "split": "train", "shifted": 0.0, "pe_spread": spread, "pe_cos": 1.0} for s in range(5, 95, 5)]
        lines.insert(7, {"step": 37, "split": "train", "shifted": 1.0})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (run_dir / "eval.json").write_text(json.dumps({"lengths": {"128": {"ppl": 100.0}, "2048": {"ppl": 110.0}}}))
        return run_dir

    low, high = fake_run("low", 0.001), fake_run("high", 1.0)
    run("collapse_signal.py", "--run", f"collapsed={low}", "--run", f"healthy={high}", "--results", str(tmp_path))
    result = json.loads((tmp_path / "collapse_signal.json").read_text())["runs"]
    assert result["collapsed"]["watch_from"] == 30 and result["collapsed"]["warned_at"] == 50  # logs 35-50 (30 is loop step 29)
    assert result["healthy"]["warned_at"] is None and 37 not in result["healthy"]["steps"]
    assert result["collapsed"]["encoder_lr"] == 3e-4
    assert (tmp_path / "collapse_signal.png").stat().st_size > 0
    assert "| collapsed | 3e-04 | 100.0 → 110.0 | 30 | 50 |" in (tmp_path / "collapse_signal.md").read_text()


@pytest.mark.slow
def test_qa_table2_over_seeds_runs(tmp_path: Path) -> None:
    """Two seeds x two methods at toy size (LM runs trained here): mean ± std cells, chance and copy rows."""
    run("qa_table2.py", "--methods", "rope-1e6", "alibi", "--seeds", "0", "1", "--jobs", "2",
        "--lm-runs", str(tmp_path / "lm"), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out"),
        "--name", "toy", "--lm-set", "train.steps=2", "--lm-set", "train.batch_size=2", "--lm-set", "train.save_every=0",
        "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=1",
        "--set", "eval.lengths=[256,512]", "--set", "eval.num_examples=3", "--set", "eval.val_examples=2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy.json", "toy.md", "toy.png"]
    result = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert result["setup"]["seeds"] == [0, 1] and list(result["table2"]) == ["rope-1e6", "alibi"]
    for method, row in result["table2"].items():
        for length in ("256", "512"):
            per_seed = [result["runs"][method][s]["lengths"][length]["ppl"] for s in ("0", "1")]
            mean, std = naive_mean_std(per_seed)
            assert row["lengths"][length]["ppl"] == pytest.approx(mean)
            assert row["lengths"][length]["ppl_std"] == pytest.approx(std)
    chance = result["baselines"]["chance"]
    assert chance["256"] == pytest.approx(100 / 14) or 0 < chance["256"] < 50  # one over the closed answer set
    copy = result["baselines"]["copy a random document's answer"]
    assert copy["256"] > copy["512"] > chance["512"]  # more documents, fewer right by copying one
    table = (tmp_path / "out" / "toy.md").read_text()
    assert "*chance*" in table and "| RoPE-10⁶ | " in table and " ± " in table


@pytest.mark.slow
def test_video_hybrid_bench_over_seeds_runs(tmp_path: Path) -> None:
    """Hybrid, two seeds x two methods at toy size: mean ± std cells that match the seeds' numbers, a chance row."""
    run("video_hybrid_bench.py", "--recipes", "hybrid", "--only", "nope", "rope_flat", "--seeds", "0", "1",
        "--set", "train.steps=2", "--set", "train.log_every=1", "--set", "eval.max_examples=8",
        "--set", "eval.val_examples=8", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "hybrid_bench.json").read_text())
    assert result["seeds"] == [0, 1] and list(result["table"]) == ["nope", "rope_flat"]
    for method, row in result["table"].items():
        for size, value in row["top1"].items():
            mean, std = naive_mean_std([result["runs"][method][s]["eval"]["sizes"][size]["top1"] for s in ("0", "1")])
            assert value == pytest.approx(mean) and row["std"][size] == pytest.approx(std)
    table = (tmp_path / "out" / "hybrid_bench.md").read_text()
    assert "| chance | 50.0 |" in table and "| NoPE | 50.0 ± 0.0 |" in table and (tmp_path / "out" / "hybrid_bench.png").is_file()

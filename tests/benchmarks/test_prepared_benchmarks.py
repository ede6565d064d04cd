"""The prepared benchmarks run end to end at toy sizes, so they cannot rot before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert {"nope", "rope", "alibi", "seqpe"} == set(result["training"]) == set(result["evaluation"])
    assert {"stock", "seqpe"} <= set(result["generation"])
    assert len(result["targets"]) >= 3 and all("met" in t for t in result["targets"])
    assert "## Targets" in (tmp_path / "gpu_dry_run.md").read_text()


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

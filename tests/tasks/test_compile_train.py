"""``train.compile: true`` trains every recipe's shipped smoke config (two steps, SeqPE: the hardest to trace).

The backend is aot_eager: dynamo traces the whole training forward and AOTAutograd its backward, as inductor's
would, in seconds instead of minutes of C++ compilation (``benchmarks/compile_speed.py`` times inductor).
"""

import json
from pathlib import Path

import pytest

from seqpe_nd.tasks.cli import main

SHORT = ["train.steps=2", "train.log_every=1", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=0",
         "train.compile=true", "train.compile_backend=aot_eager"]
SMOKE = {
    "lm": ("configs/lm/smoke/seqpe.yaml", ["eval.val_blocks=2"]),
    "vit": ("configs/vit/smoke/seqpe_attn_mul.yaml", ["eval.val_images=8"]),
    "video": ("configs/video/smoke/seqpe.yaml", ["eval.val_clips=8"]),
    "hybrid": ("configs/hybrid/smoke/seqpe.yaml", ["eval.val_examples=8"]),
}


def train_compiled(config: str, run_dir: Path, extra: list[str]) -> list[dict]:
    overrides = [item for pair in (("--set", s) for s in [*SHORT, *extra]) for item in pair]
    assert main(["train", config, "--run-dir", str(run_dir), *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["train"]["compile"] is True
    return train


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vit", "video", "hybrid"])  # lm: in the QA test below
def test_compile_true_trains_the_smoke_config(task: str, tmp_path: Path) -> None:
    config, extra = SMOKE[task]
    train = train_compiled(config, tmp_path / task, extra)
    assert all(0.0 < r["loss"] < 20.0 for r in train)


@pytest.mark.slow
def test_compile_true_trains_the_lm_smoke_config_and_fine_tunes_the_qa_one(tmp_path: Path) -> None:
    """QA fine-tunes an LM run: the LM smoke run (two compiled steps), then the QA smoke config from it."""
    config, extra = SMOKE["lm"]
    assert all(0.0 < r["loss"] < 20.0 for r in train_compiled(config, tmp_path / "lm", extra))
    qa = ["init_from=" + str(tmp_path / "lm"), "eval.val_examples=4"]
    train = train_compiled("configs/qa/smoke/seqpe.yaml", tmp_path / "qa", qa)
    assert all(0.0 < r["loss"] < 20.0 for r in train)

"""``seqpe-nd export``: a trained run becomes a model loaded back without this project's run layout, exact."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import seqpe_nd.tasks.attach  # noqa: F401  (registers the PE model classes with the Auto classes)
from seqpe_nd.tasks.attach import load_vit
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.recipes import lm
from seqpe_nd.tasks.recipes.vit import ViTRecipe
from tests.tasks.test_lm import tiny_config as lm_config
from tests.tasks.test_vit_recipe import tiny_config as vit_config


def test_an_lm_run_exports_to_the_hugging_face_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(lm_config(tmp_path, steps=2, save_every=2)))
    run, out = tmp_path / "run", tmp_path / "shared"
    assert main(["train", str(config), "--run-dir", str(run)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["position_encoding"]["config"]["method"] == "seqpe"
    ours = lm.LMRecipe.from_run(run).load_trained()
    back = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("the cat sat on a mat near one old tree")["input_ids"]])
    assert tok.decode(ids[0]) == "the cat sat on a mat near one old tree" and tok.eos_token == "<|endoftext|>"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_a_vit_run_exports_to_the_timm_format_and_refuses_what_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "vit.yaml"
    config.write_text(yaml.safe_dump(vit_config({"method": "rope_mixed"}, steps=1)))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run)]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "not an empty directory; nothing was written" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 0
    ours = ViTRecipe.from_run(run).load_trained()
    back = load_vit(tmp_path / "shared")
    x = torch.randn(2, 3, 24, 36)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x).logits, rtol=0, atol=0)
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "task": "video"}))
    assert main(["export", str(run), "--out", str(tmp_path / "other")]) == 2
    assert "export writes runs of task lm, qa, vit; this one is 'video'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()

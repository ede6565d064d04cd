"""The CLI says what it wrote: train its run directory and checkpoint, eval its files (merging sizes into
``eval.json``), ``--version`` the package's version, and ``plot`` draws the encoder a run trained."""

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.cli.plot import encoder_of_run
from seqpe_nd.tasks.recipes.vit import ViTRecipe
from tests.tasks.test_vit_recipe import tiny_config

SEQPE = {"method": "seqpe", "integration": "attn_mul", "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SeqPE ViT config and its run, trained for 2 steps through the CLI."""
    root = tmp_path_factory.mktemp("outputs")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(SEQPE, steps=2)))
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return config, root / "run"


def test_train_prints_its_run_directory_and_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"method": "rope_axial"}, steps=1)))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"run directory: {tmp_path / 'run'}" in lines
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step_00000001'}" in lines
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors").is_file()


def test_eval_prints_its_files_and_merges_sizes(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    assert main(["eval", str(run), "--resolutions", "16", "24", "--max-images", "4"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'eval.json'}, {run / 'eval.png'}" in out and "measured before" not in out
    assert main(["eval", str(run), "--resolutions", "24", "32", "--max-images", "8"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'eval.json'}" in out and "eval.json also keeps size(s) 16 measured before" in out
    saved = json.loads((run / "eval.json").read_text())
    rows = saved["resolutions"]
    assert list(rows) == ["16", "24", "32"]  # 16 kept, 24 re-measured (replaced), 32 added
    assert rows["16"]["images"] == 4 and rows["24"]["images"] == 8 and rows["32"]["images"] == 8
    assert saved["weights"] == "checkpoints/step_00000002"
    # the Python API returns what it measured; the file holds every size
    res = ViTRecipe.evaluate(run, resolutions=[20], max_images=4, quiet=True)
    assert list(res["resolutions"]) == ["20"]
    assert list(json.loads((run / "eval.json").read_text())["resolutions"]) == ["16", "20", "24", "32"]


def test_eval_of_other_weights_replaces_the_file_and_says_so(trained: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["eval", str(copy), "--resolutions", "16", "--max-images", "4"]) == 0
    assert main(["train", str(config), "--run-dir", str(copy), "--resume", "--set", "train.steps=3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(copy), "--resolutions", "24", "--max-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "the earlier eval.json was replaced: its weights differed" in out
    saved = json.loads((copy / "eval.json").read_text())
    assert list(saved["resolutions"]) == ["24"] and saved["weights"] == "checkpoints/step_00000003"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"seqpe-nd {version('seqpe-nd')}"


def test_plot_draws_the_encoder_a_run_trained(trained: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    assert main(["plot", "similarity", "--run", str(run), "--out", str(tmp_path)]) == 0
    assert f"loaded the SeqPE encoder of {run / 'checkpoints' / 'step_00000002'}" in capsys.readouterr().out
    assert (tmp_path / "similarity-2d.png").read_bytes()[:4] == b"\x89PNG"
    encoder, _ = encoder_of_run(run)
    model = ViTRecipe.from_run(run).load_trained()
    trained_encoder = next(m for m in model.modules() if type(m).__name__ == "SeqPE")
    for name, tensor in trained_encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], tensor)


def test_plot_of_a_run_without_seqpe_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "rope.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"method": "rope_axial"}, steps=1)))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["plot", "similarity", "--run", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "trained pe.method 'rope_axial'; plot similarity draws SeqPE encoders" in capsys.readouterr().err
    assert main(["plot", "similarity", "--space", "configs/positions/text-512.yaml", "--checkpoint", "x"]) == 2
    assert "--checkpoint picks a checkpoint of --run RUN_DIR" in capsys.readouterr().err


def test_eval_takes_any_recipe_option_without_a_flag_of_its_own(trained: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    assert main(["eval", str(run), "--option", "resolutions=[16]", "--option", "max_images=4"]) == 0
    assert json.loads((run / "eval.json").read_text())["resolutions"]["16"]["images"] == 4
    assert main(["eval", str(run), "--option", "max_clips=4"]) == 2
    err = capsys.readouterr().err
    assert "has no option(s) ['max_clips']; allowed: resolutions, max_images, batch_size" in err
    assert main(["eval", str(run), "--max-images", "4", "--option", "max_images=8"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["eval", str(run), "--option", "max_images"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert main(["eval", str(run), "--set", "eval.resolutions=[20]", "--set", "eval.max_images=2"]) == 0
    assert json.loads((run / "eval.json").read_text())["resolutions"]["20"]["images"] == 2
    assert main(["eval", str(run), "--set", "train.steps=3"]) == 2
    assert "eval takes the run config's eval settings only" in capsys.readouterr().err

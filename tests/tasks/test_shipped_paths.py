"""Config paths work from any folder: a relative path not found there falls back to the configs shipped
with the package (one lookup, :func:`seqpe_nd.positions.errors.find_config_file`), and a miss lists every
place looked."""

from pathlib import Path

import pytest

from seqpe_nd.encodings import build_position_encoding, load_pe_config
from seqpe_nd.positions import load_space
from seqpe_nd.positions.errors import SHIPPED_ROOT, find_config_file
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.recipes import load_config

VIT = "configs/vit/smoke/seqpe_attn_mul.yaml"
SPACE = "configs/positions/image-14x14.yaml"
TINY = ["--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "data.procedural.val_size=8",
        "--set", "eval.val_images=8"]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the checkout, with no configs/ of its own."""
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    return tmp_path


def test_the_api_finds_shipped_configs_from_any_folder(elsewhere: Path) -> None:
    assert load_space(SPACE).L == (14, 14)
    assert load_config(VIT).task == "vit"
    pe = build_position_encoding({"method": "rope_axial"}, space=SPACE, num_heads=2, head_dim=8, num_layers=1, d_model=16)
    assert pe.width == 2


def test_a_local_file_comes_before_the_shipped_one(elsewhere: Path) -> None:
    (elsewhere / "configs" / "positions").mkdir(parents=True)
    (elsewhere / SPACE).write_text("L: [3, 3]\nL_max: [9, 9]\n")
    assert load_space(SPACE).L == (3, 3)
    assert find_config_file(SPACE) == Path(SPACE)


def test_a_miss_lists_every_place_looked(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_space("configs/positions/nowhere.yaml")
    text = str(err.value)
    assert "position-space file 'configs/positions/nowhere.yaml' does not exist; looked for" in text
    assert str(elsewhere / "configs/positions/nowhere.yaml") in text
    assert str(SHIPPED_ROOT / "configs/positions/nowhere.yaml") in text
    with pytest.raises(FileNotFoundError, match="position-encoding config file 'pe.yaml' does not exist"):
        load_pe_config("pe.yaml")
    # a run config's space: the config's folder first, then the working directory, then the shipped configs
    (elsewhere / "exp").mkdir()
    (elsewhere / "exp" / "run.yaml").write_text(f"extends: {VIT}\nspace: my-space.yaml\n")  # extends: shipped too
    assert main(["train", "exp/run.yaml"]) == 2
    err_text = capsys.readouterr().err
    assert "space file 'my-space.yaml' does not exist; looked for" in err_text
    for place in (elsewhere / "exp" / "my-space.yaml", elsewhere / "my-space.yaml", SHIPPED_ROOT / "my-space.yaml"):
        assert str(place) in err_text
    assert main(["space", "show", "nowhere.yaml"]) == 2
    assert "looked for " + str(elsewhere / "nowhere.yaml") in capsys.readouterr().err


def test_the_cli_finds_shipped_configs_from_any_folder(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", "show", SPACE, "--num", "2"]) == 0
    assert "L=[14, 14]" in capsys.readouterr().out
    assert main(["train", VIT, "--run-dir", "run", *TINY]) == 0
    out = capsys.readouterr().out
    assert (elsewhere / "run" / "config.json").is_file() and not (SHIPPED_ROOT / "run").exists()
    assert "run directory: run\n" in out and "checkpoint: run/checkpoints/step_00000001\n" in out  # story 7
    assert main(["plot", "similarity", "--space", SPACE, "--out", "plots", "--d-model", "8", "--hidden", "16"]) == 0
    assert (elsewhere / "plots" / "similarity-2d.png").is_file()

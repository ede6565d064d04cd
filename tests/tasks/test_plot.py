"""``seqpe-nd plot similarity``: Fig. 2 / Fig. 3 PNGs from a fresh, trained or saved encoder."""

from pathlib import Path

import pytest
import torch

from seqpe_nd.encoder import SeqPE, load_encoder, save_encoder
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.cli.plot import similarity_1d, similarity_2d

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "positions"
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--d-model", "16", "--hidden", "32"]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_fig2_from_a_space_after_training(tmp_path, capsys):
    code = main(["plot", "similarity", "--space", str(CONFIGS / "text-512.yaml"), "--out", str(tmp_path),
                 "--num", "64", "--train-steps", "3", "--save", str(tmp_path / "enc"), *TINY])
    assert code == 0
    assert is_png(tmp_path / "similarity-1d.png")
    printed = capsys.readouterr().out
    assert "trained 3 steps on L_δ" in printed and "wrote" in printed
    assert (tmp_path / "enc" / "encoder.safetensors").is_file()


def test_fig3_from_a_saved_encoder(tmp_path):
    torch.manual_seed(0)
    enc = SeqPE(load_space(CONFIGS / "image-14x14.yaml"), 16, hidden=32)
    save_encoder(enc, tmp_path / "enc")
    code = main(["plot", "similarity", "--encoder", str(tmp_path / "enc"), "--out", str(tmp_path), "--extent", "6x5"])
    assert code == 0 and is_png(tmp_path / "similarity-2d.png")


def test_similarity_values_are_dot_products():
    torch.manual_seed(0)
    one = SeqPE(load_space(CONFIGS / "text-512.yaml"), 8, hidden=32, dropout=0.0).eval()
    e = one(torch.arange(10)[:, None]).detach()
    torch.testing.assert_close(similarity_1d(one, 10), e @ e.T)
    two = SeqPE(load_space(CONFIGS / "image-14x14.yaml"), 8, hidden=32, dropout=0.0).eval()
    picks, sim = similarity_2d(two, (3, 4))
    assert picks == [(0, 0), (0, 3), (1, 2), (2, 0), (2, 3)]
    grid = two(two.space.positions([3, 4])).detach()
    torch.testing.assert_close(sim[2], grid[1 * 4 + 2] @ grid.T)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", str(CONFIGS / "video-8x14x14.yaml")], "this space is 3-D"),
        (["--space", str(CONFIGS / "hybrid-text-image.yaml")], "this space is hybrid"),
        (["--space", str(CONFIGS / "text-512.yaml"), "--num", "30000"], "--num = 30000"),
        (["--space", str(CONFIGS / "image-14x14.yaml"), "--extent", "14by14"], "is not HxW"),
        (["--encoder", "no/such/folder"], "no encoder.safetensors"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    assert main(["plot", "similarity", *args, "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "seqpe-nd plot: error:" in err and message in err


def test_saved_encoder_round_trips_through_the_cli(tmp_path):
    main(["plot", "similarity", "--space", str(CONFIGS / "text-512.yaml"), "--out", str(tmp_path),
          "--num", "8", "--save", str(tmp_path / "enc"), *TINY])
    enc = load_encoder(tmp_path / "enc")
    assert enc.config["hidden"] == 32 and enc.d_model == 16

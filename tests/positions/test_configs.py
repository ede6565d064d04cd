"""Every shipped position-space YAML loads, and `seqpe-nd space show` works on each."""

import pytest

from seqpe_nd.positions import GridSpace, HybridSpace, load_space
from seqpe_nd.tasks.cli import main
from tests.positions.conftest import shipped_configs


def test_the_four_shipped_spaces():
    names = {p.stem: load_space(p) for p in shipped_configs()}
    assert {"text-512", "image-14x14", "video-8x14x14", "hybrid-text-image"} <= set(names)
    text, image, video, hybrid = (names[n] for n in ("text-512", "image-14x14", "video-8x14x14", "hybrid-text-image"))
    assert isinstance(text, GridSpace) and text.ndim == 1 and text.k == 5
    assert isinstance(image, GridSpace) and image.ndim == 2 and image.k == 2
    assert isinstance(video, GridSpace) and video.L == (8, 14, 14)
    assert isinstance(hybrid, HybridSpace) and [m.name for m in hybrid.modalities] == ["text", "image"]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.stem)
def test_space_show(path, capsys):
    assert main(["space", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pairwise distances" in out and "[CLS]" in out


def test_space_show_reports_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: grid\nL: 600\nL_max: 500\n")
    assert main(["space", "show", str(bad)]) == 2
    assert "L[0] = 600 exceeds L_max[0] = 500" in capsys.readouterr().err


def test_spaces_compare_by_fields_after_tables_are_cached():
    a, b = load_space(shipped_configs()[0]), load_space(shipped_configs()[0])
    a.sample_uniform(4, __import__("torch").Generator())  # fills cached tensor tables on a only
    assert a == b and hash(a) == hash(b)
    assert a != load_space(shipped_configs()[1])


def test_cached_tables_stay_on_cpu_under_another_default_device():
    import torch

    space = load_space(shipped_configs()[0])
    with torch.device("meta"):
        assert space.box_max_hi.device.type == "cpu" and space.place_ids.device.type == "cpu"

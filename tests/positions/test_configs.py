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


def _spaces_under_configs() -> dict[str, object]:
    """Every position space the shipped configs define: space YAMLs and recipes' ``space:`` entries."""
    import yaml

    root = shipped_configs()[0].parents[1]
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            continue
        if "kind" in data or ("L" in data and "L_max" in data):
            found[str(path.relative_to(root))] = load_space(path)
        elif isinstance(data.get("space"), dict):
            found[f"{path.relative_to(root)}:space"] = load_space(data["space"])
        elif isinstance(data.get("space"), str):
            ref = root.parent / data["space"]
            found[str(ref.relative_to(root))] = load_space(ref)
    return found


def test_text_spaces_give_global_pivots_hard_negatives_as_released():
    """Released text sampler: 60 % local, 40 % global, every global pivot with 25 % of C lexical hard negatives."""
    text = {name: s for name, s in _spaces_under_configs().items() if isinstance(s, GridSpace) and s.ndim == 1}
    assert {"positions/text-512.yaml", "lm/smoke/text-128.yaml"} <= set(text)
    for name, space in text.items():
        mix = {k: v for k, v in space.contrastive.mix.items() if v > 0}
        assert mix == {"global_hard": 0.4, "local": 0.6}, f"{name}: mix {mix}"
        assert space.contrastive.hard_fraction == 0.25, name

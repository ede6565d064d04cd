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


@pytest.mark.parametrize(
    ("space", "floor"),
    [
        ({"L": 512, "L_max": 20000}, 32),  # the paper's text: 16 · 20 000 / 10⁴
        ({"L": [14, 14], "L_max": [100, 100]}, 16),  # the paper's images: 16 · 100² / 10⁴
        ({"L": 128, "L_max": 5000}, 8),
        ({"L": 8, "L_max": 64}, 1),
        ({"L": [8, 14, 14], "L_max": [24, 42, 42]}, 68),  # ceil(16 · 42 336 / 10⁴)
    ],
)
def test_regularizer_batches_meet_appendix_a4(space, floor):
    """A.4: L_δ's and L_OOD's batches at least 16·L_max/10⁴ (L_max in positions). Defaults rise to the floor;
    a value set below it is one clear error naming the field, the value and the floor."""
    got = load_space(space)
    assert got.min_regularizer_batch() == floor
    assert got.contrastive.batch == max(16, floor) and got.ood.num_starts == max(16, floor)
    assert load_space({**space, "ood": {"num_starts": floor}}).ood.num_starts == floor
    if floor > 1:
        for section, field in (("contrastive", "batch"), ("ood", "num_starts")):
            with pytest.raises(ValueError, match=rf"{section}\.{field} = {floor - 1} is below Appendix A\.4's floor.*= {floor} per step"):
                load_space({**space, section: {field: floor - 1}})


def test_hybrid_regularizer_floor_counts_every_modality():
    hybrid = load_space({"kind": "hybrid", "modalities": [{"name": "text", "space": {"L": 512, "L_max": 20000}},
                                        {"name": "image", "space": {"L": [14, 14], "L_max": [100, 100]}}]})
    assert hybrid.regularizer_volume() == 30000 and hybrid.min_regularizer_batch() == 48
    assert hybrid.contrastive.batch == 48 and hybrid.ood.num_starts == 48

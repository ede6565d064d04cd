"""Every bad input fails before any compute, with a message naming the value and the limit."""

import pytest
import torch
from pydantic import ValidationError

from seqpe_nd.positions import load_space
from tests.positions.conftest import SPACES


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"L": 4, "L_max": 100, "base": 1}, "base = 1"),
        ({"L": 0, "L_max": 100}, "greater than 0"),
        ({"L": 200, "L_max": 100}, "L[0] = 200 exceeds L_max[0] = 100"),
        ({"L": [4, 4], "L_max": [10]}, "one entry per dim"),
        ({"L": 4, "L_max": 100, "distance": "cosine"}, "unknown distance 'cosine'; valid distances: chebyshev, euclidean"),
        ({"L": 4, "L_max": 1000, "k": 2}, "k = 2 digits in base 10 reach only 99"),
        ({"L": 4, "L_max": 100, "colour": "red"}, "colour"),
        ({"kind": "torus", "L": 4, "L_max": 100}, "'torus'"),
        ({"L": 4, "L_max": 100, "contrastive": {"mix": {"global": 0.5, "local": 0.2}}}, "sum to 1"),
        ({"L": 4, "L_max": 100, "contrastive": {"mix": {"everywhere": 1.0}}}, "everywhere"),
        ({"L": [4, 4], "L_max": [100, 100], "contrastive": {"local_window": [3, 3, 3]}}, "needs 2 entries"),
        ({"L": [4, 4], "L_max": [100, 100], "ood": {"num_teachers": 17}}, "ood.num_teachers = 17 exceeds |D_train| = 16"),
    ],
)
def test_bad_configs(config, needle):
    with pytest.raises((ValueError, ValidationError)) as err:
        load_space(config)
    assert needle in str(err.value)


def test_unknown_field_names_its_path():
    with pytest.raises(ValueError) as err:
        load_space({"L": 4, "L_max": 100, "ood": {"num_teacher": 3}})
    assert "ood.num_teacher: unknown field 'num_teacher' (did you mean 'num_teachers'?)" in str(err.value)


def test_a_mapping_speaks_as_the_cli():
    """The union's tag is not shown, a near miss says what was meant, and its "Field required" is not repeated."""
    with pytest.raises(ValueError) as err:
        load_space({"L": 4, "Lmax": 100})
    assert not isinstance(err.value, ValidationError)
    assert str(err.value) == "Lmax: unknown field 'Lmax' (did you mean 'L_max'?); allowed: L, L_max, base, contrastive, distance, k, kind, ood, shift"


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"L": 10, "L_max": 12, "ood": {"min_shift": 1.0}}, "ood.min_shift = 1.0 is not allowed for this space: it must be in [0, 0.2]"),
        ({"L": [4, 4], "L_max": [4, 4], "ood": {"min_shift": 0.25}}, "ood.min_shift = 0.25 is not allowed for this space: it must be in [0, 0]"),
        ({"kind": "hybrid", "modalities": [{"name": "text", "space": {"L": 16, "L_max": 20}}], "ood": {"min_shift": 0.5}},
         "ood.min_shift = 0.5 is not allowed for this space: it must be in [0, 0.25]"),
    ],
)
def test_an_ood_shift_out_of_reach_fails_at_load(config, needle):
    """Was accepted, then failed inside pe.prepare at the first training step."""
    with pytest.raises(ValueError) as err:
        load_space(config)
    assert needle in str(err.value)


def test_a_space_without_room_loads_when_min_shift_is_not_set():
    """L = L_max is fine for a method without L_OOD; SeqPE with β > 0 refuses it when it is built."""
    assert load_space({"L": 16, "L_max": 16}).ood.min_shift == 0.25


@pytest.mark.parametrize(
    ("pos", "needle"),
    [
        (torch.tensor([[3, 1000]]), "coordinate 1000 in dim 1 needs 4 digits but k = 3 in base 10 allows at most 999"),
        (torch.tensor([[-2, 5]]), "coordinate -2 in dim 0 is negative"),
        (torch.tensor([[1, 2, 3]]), "expects positions with 2 coordinates, got 3"),
    ],
)
def test_bad_grid_positions(pos, needle):
    space = load_space({"L": [4, 4], "L_max": [500, 500]})
    with pytest.raises(ValueError) as err:
        space.tokenize(pos)
    assert needle in str(err.value)


def test_float_positions_are_refused():
    space = load_space({"L": [4, 4], "L_max": [500, 500]})
    # under the test-time jaxtyping hook the annotation refuses it first; without it, check() does
    with pytest.raises((ValueError, TypeError), match="integer tensor|f32"):
        space.tokenize(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        space._check_width(torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize(
    ("pos", "needle"),
    [
        ([3, 0, 0, 0, 0], "modality id 3 is not allowed; valid ids are 0..2"),
        ([0, -1, 0, 0, 0], "timeline coordinate -1 is negative"),
        ([0, 1000, 0, 0, 0], "timeline coordinate 1000 needs more than 3 digits"),
        ([0, 5, 1, 0, 0], "modality 'text', which has only 0 local dims"),
        ([1, 5, 0, 0, 4], "modality 'image', which has only 2 local dims"),
        ([1, 5, 100, 0, 0], "local coordinate 100 (dim 0, modality 'image') needs more than k = 2"),
        ([2, 5, 0, -3, 0], "local coordinate -3 (dim 1, modality 'video') is negative"),
    ],
)
def test_bad_hybrid_positions(pos, needle):
    space = load_space(SPACES["hybrid"])
    with pytest.raises(ValueError) as err:
        space.tokenize(torch.tensor([pos]))
    assert needle in str(err.value)


def test_bad_hybrid_configs():
    text = {"name": "text", "space": {"L": 16, "L_max": 300}}
    with pytest.raises(ValueError, match="must be unique"):
        load_space({"kind": "hybrid", "modalities": [text, text]})
    with pytest.raises(ValueError, match="not a metric"):
        load_space({"kind": "hybrid", "modalities": [text, {"name": "im", "space": {"L": [2, 2], "L_max": [9, 9], "distance": "squared_euclidean"}}]})
    with pytest.raises(ValueError, match="timeline is required"):
        load_space({"kind": "hybrid", "modalities": [{"name": "im", "space": {"L": [2, 2], "L_max": [9, 9]}}]})
    with pytest.raises(ValueError, match="share one base"):
        load_space({"kind": "hybrid", "modalities": [text, {"name": "im", "space": {"L": [2, 2], "L_max": [9, 9], "base": 16}}]})
    with pytest.raises(ValueError, match="unknown modality 'audio'; this space has text"):
        load_space({"kind": "hybrid", "modalities": [text]}).layout("audio:3")
    with pytest.raises(ValueError, match="has 1 dims, but modality 'image' is 2-D"):
        load_space(SPACES["hybrid"]).layout("image:7")
    with pytest.raises(ValueError, match="NAME:EXTENT"):
        load_space(SPACES["hybrid"]).layout("image=7")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_space(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path):
    from seqpe_nd.encodings import load_pe_config

    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping with a 'kind' field, got list"):
        load_space(bad)
    with pytest.raises(ValueError, match="must hold a mapping with a 'method' field, got list"):
        load_pe_config(bad)
    with pytest.raises(FileNotFoundError, match="position-encoding config file .*nope.yaml"):
        load_pe_config(tmp_path / "nope.yaml")

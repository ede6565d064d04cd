import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpe_nd.positions import get_distance, list_distances, load_space, register_distance
from tests.positions.conftest import SPACES


def naive(name: str, a: list[int], b: list[int]) -> float:
    diffs = [x - y for x, y in zip(a, b)]
    return {
        "euclidean": math.sqrt(sum(d * d for d in diffs)),
        "squared_euclidean": float(sum(d * d for d in diffs)),
        "manhattan": float(sum(abs(d) for d in diffs)),
        "chebyshev": float(max(abs(d) for d in diffs)),
    }[name]


@pytest.mark.parametrize("name", ["euclidean", "squared_euclidean", "manhattan", "chebyshev"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_builtin_distances_match_formula(name, ndim):
    g = torch.Generator().manual_seed(ndim)
    a, b = torch.randint(0, 50, (7, ndim), generator=g), torch.randint(0, 50, (5, ndim), generator=g)
    got = get_distance(name)(a[:, None], b[None])  # broadcasts to (7, 5)
    assert got.shape == (7, 5)
    for i, j in itertools.product(range(7), range(5)):
        assert got[i, j].item() == pytest.approx(naive(name, a[i].tolist(), b[j].tolist()))


coords = st.lists(st.integers(0, 60), min_size=3, max_size=3)


@settings(max_examples=80, deadline=None)
@given(a=coords, b=coords, c=coords)
@pytest.mark.parametrize("name", ["euclidean", "manhattan", "chebyshev"])
def test_metric_axioms(name, a, b, c):
    d = get_distance(name)
    ta, tb, tc = (torch.tensor(x) for x in (a, b, c))
    assert (d(ta, tb) == 0) == (a == b)
    assert d(ta, tb) == d(tb, ta)
    assert d(ta, tc) <= d(ta, tb) + d(tb, tc) + 1e-9


def test_squared_euclidean_is_flagged_non_metric():
    assert not get_distance("squared_euclidean").metric
    d = get_distance("squared_euclidean")
    a, b, c = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    assert d(a, c) > d(a, b) + d(b, c)  # why it is flagged


def test_register_and_use_from_yaml_dict():
    register_distance("half_manhattan", lambda a, b: (a - b).abs().sum(-1).double() / 2, overwrite=True)
    assert "half_manhattan" in list_distances()
    space = load_space({"L": [2, 2], "L_max": [9, 9], "distance": "half_manhattan"})
    assert space.delta(torch.tensor([0, 0]), torch.tensor([3, 4])).item() == 3.5
    with pytest.raises(ValueError, match="already registered"):
        register_distance("half_manhattan", lambda a, b: a)


hybrid_space = load_space(SPACES["hybrid"])


@st.composite
def hybrid_positions(draw):
    g = draw(st.integers(0, 2))
    nd = [0, 2, 3][g]
    local = [draw(st.integers(0, 19 if nd == 2 else 7 if i == 0 else 11)) for i in range(nd)]
    return [g, draw(st.integers(0, 299)), *local, *[0] * (3 - nd)]


@settings(max_examples=200, deadline=None)
@given(a=hybrid_positions(), b=hybrid_positions(), c=hybrid_positions())
def test_hybrid_distance_is_a_metric(a, b, c):
    d = hybrid_space.delta
    ta, tb, tc = (torch.tensor(x) for x in (a, b, c))
    assert (d(ta, tb).item() == 0) == (a == b)
    assert d(ta, tb).item() == pytest.approx(d(tb, ta).item())
    assert d(ta, tc).item() <= d(ta, tb).item() + d(tb, tc).item() + 1e-9


def test_hybrid_distance_reduces_to_modality_distance_inside_a_segment():
    lay = hybrid_space.layout("text:5, image:4x3, video:2x3x2")
    pos, mod = lay.positions, lay.modality
    d = hybrid_space.delta(pos[:, None], pos[None])
    text = pos[mod == 0][:, 1:2]
    assert torch.equal(d[mod == 0][:, mod == 0], get_distance("euclidean")(text[:, None], text[None]))
    for g, n in ((1, 2), (2, 3)):
        local = pos[mod == g][:, 2 : 2 + n]
        assert torch.allclose(d[mod == g][:, mod == g], get_distance("euclidean")(local[:, None], local[None]))


def test_hybrid_cross_modality_formula():
    # text at t=2; image patch (1, 2) anchored at t=5: |2-5| + 0 + gap + sqrt(1+4)
    a, b = torch.tensor([0, 2, 0, 0, 0]), torch.tensor([1, 5, 1, 2, 0])
    assert hybrid_space.delta(a, b).item() == pytest.approx(3 + 1.0 + math.sqrt(5))

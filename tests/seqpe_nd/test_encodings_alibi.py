"""ALiBi and N-D ALiBi against their formulas written out as loops, on both score backends."""

import itertools
import math

import jaxtyping
import pytest
import torch

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.functional import alibi_slopes
from seqpe_nd.positions import get_distance, load_space

HYBRID = {
    "kind": "hybrid",
    "modalities": [
        {"name": "text", "space": {"L": 16, "L_max": 300}},
        {"name": "image", "space": {"L": [3, 3], "L_max": [20, 20]}},
    ],
}


@pytest.fixture
def flex_traceable():
    """FlexAttention traces score_mod with dynamo, which rejects the side effects of the runtime
    shape checker these tests install; switch it off around FlexAttention calls only."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def space(extent: list[int], distance: str = "euclidean"):
    return load_space({"L": extent, "L_max": [e * 2000 for e in extent], "distance": distance})


def build(method: str, sp, heads: int = 4, **cfg):
    return build_position_encoding(
        {"method": method, **cfg}, space=sp, num_heads=heads, head_dim=8, num_layers=2, d_model=heads * 8
    )


def test_slopes_are_press_et_al_for_8_and_12_heads() -> None:
    # Press et al. (2022), §3: 8 heads → 1/2, 1/4, …, 1/256; 12 heads → those 8 plus every other
    # slope of the 16-head sequence 2^-0.5, 2^-1, … : 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    eight = [2.0**-i for i in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(eight))
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(eight + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))


def naive_attention(q, k, v, bias_fn, causal: bool) -> torch.Tensor:
    """softmax(q·kᵀ/√e + bias) v, one (batch, head, query) at a time."""
    b, h, n, e = q.shape
    m = k.shape[2]
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi, hi, i in itertools.product(range(b), range(h), range(n)):
        scores = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(e) + bias_fn(bi, hi, i, j) for j in range(m)])
        if causal:
            scores[torch.arange(m) > i + (m - n)] = float("-inf")
        out[bi, hi, i] = torch.softmax(scores, 0) @ v[bi, hi]
    return out


@pytest.mark.parametrize("backend", ["bias", "flex"])
@pytest.mark.usefixtures("flex_traceable")
def test_alibi_equals_the_causal_formula(backend: str) -> None:
    torch.manual_seed(0)
    pe = build("alibi", space([12]), backend=backend)
    pos = torch.stack([torch.arange(9), torch.arange(30, 39)])[..., None]  # rows differ: a [b, h, n, m] bias
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    with torch.no_grad():  # FlexAttention has no CPU backward
        got = pe.attend(q, k, v, pe.prepare(pos), 0, causal=True)
    slopes = alibi_slopes(4)
    want = naive_attention(q, k, v, lambda b, h, i, j: -slopes[h] * (i - j), causal=True)  # Eq. 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_backend_refuses_cpu_training() -> None:
    pe = build("alibi", space([8]), backend="flex")
    q = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        pe.attend(q, q, q, pe.prepare(torch.arange(8)[None, :, None]), 0, causal=True)


ND_CASES = [
    ([7], "euclidean"),
    ([3, 3], "manhattan"),
    ([3, 3], "euclidean"),
    ([2, 2, 2], "chebyshev"),
    ([3, 2], "squared_euclidean"),
]


@pytest.mark.parametrize(
    ("extent", "distance", "backend"),
    [(*c, "bias") for c in ND_CASES] + [(*ND_CASES[1], "flex"), (*ND_CASES[3], "flex")],
)
@pytest.mark.usefixtures("flex_traceable")
def test_alibi_nd_equals_loops(extent: list[int], distance: str, backend: str) -> None:
    torch.manual_seed(0)
    sp = space(extent, distance)
    pe = build("alibi_nd", sp, heads=3, backend=backend)
    pos = sp.positions()[None] + 5
    n = pos.shape[1]
    q, k, v = (torch.randn(1, 3, n, 8, dtype=torch.float32) for _ in range(3))
    with torch.no_grad():
        got = pe.attend(q, k, v, pe.prepare(pos), 1, causal=False)
    slopes = alibi_slopes(3)

    def bias(b: int, h: int, i: int, j: int) -> torch.Tensor:
        d = pos[0, i] - pos[0, j]
        delta = {
            "euclidean": d.double().norm(),
            "manhattan": d.abs().sum(),
            "chebyshev": d.abs().max(),
            "squared_euclidean": d.square().sum(),
        }[distance]
        return -slopes[h] * float(delta)

    torch.testing.assert_close(got, naive_attention(q, k, v, bias, causal=False), rtol=1e-5, atol=1e-5)


def test_alibi_nd_distance_option_overrides_the_space() -> None:
    sp = space([3, 3], "euclidean")
    pe = build("alibi_nd", sp, distance="manhattan")
    a, b = torch.tensor([0, 0]), torch.tensor([1, 2])
    assert float(pe.distance(a, b)) == 3.0 and pe.delta is get_distance("manhattan")
    assert float(build("alibi_nd", sp).distance(a, b)) == pytest.approx(math.sqrt(5))


def test_alibi_nd_on_a_hybrid_space_uses_its_metric() -> None:
    sp = load_space(HYBRID)
    pe = build("alibi_nd", sp, heads=2)
    pos = sp.layout("text:3, image:2x2, text:2").positions[None]
    bias = pe.score_mod(pe.prepare(pos), 0)(
        torch.zeros(()),
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(2).view(1, 2, 1, 1),
        torch.arange(9).view(1, 1, 9, 1),
        torch.arange(9).view(1, 1, 1, 9),
    )
    want = -alibi_slopes(2).view(2, 1, 1) * sp.delta(pos[0, :, None], pos[0, None, :]).float()
    torch.testing.assert_close(bias[0], want)
    with pytest.raises(ValueError, match="no rule for hybrid"):
        build("alibi", sp)


@pytest.mark.parametrize(
    ("method", "extent"), [("alibi", [10]), ("alibi_nd", [10]), ("alibi_nd", [3, 4]), ("alibi_nd", [2, 2, 3])]
)
def test_alibi_is_shift_invariant_even_far_out(method: str, extent: list[int]) -> None:
    """Biases come from relative distances in float32: a start shift of ~16K changes nothing
    (the released code's absolute-index bias in bf16 collapsed there)."""
    torch.manual_seed(0)
    sp = space(extent)
    pe = build(method, sp)
    pos = sp.positions()[None]
    q, k, v = (torch.randn(1, 4, pos.shape[1], 8) for _ in range(3))
    z = torch.tensor([16_000, 3, 7][: len(extent)])
    out = [pe.attend(q, k, v, pe.prepare(p), 0, causal=True) for p in (pos, pos + z)]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_one_dense_bias_per_forward_shared_by_layers() -> None:
    pe = build("alibi", space([8]), backend="bias")
    state = pe.prepare(torch.arange(8).repeat(3, 1)[..., None])
    q = torch.randn(3, 4, 8, 8)
    for layer in range(2):
        pe.attend(q, q, q, state, layer, causal=True)
    biases = [v for key, v in state._memo.items() if key[0] == "bias"]
    assert len(biases) == 1 and biases[0].shape == (1, 4, 8, 8)  # rows share positions: [1, h, n, m]
    assert biases[0].dtype == torch.float32


@pytest.mark.parametrize("backend", ["bias", "flex"])
@pytest.mark.parametrize(("method", "extent"), [("alibi", [10]), ("alibi_nd", [3, 4])])
@pytest.mark.parametrize("offset", [2**25 + 3, 2**53 + 3])
@pytest.mark.usefixtures("flex_traceable")
def test_alibi_bias_is_exact_beyond_float_precision(method: str, extent: list[int], offset: int, backend: str) -> None:
    """Distances are taken between integers, then cast: starts past 2**24 (float32) and 2**53
    (float64), where consecutive integers no longer have distinct float values, change nothing."""
    torch.manual_seed(0)
    sp = space(extent, "manhattan")
    pe = build(method, sp, backend=backend)
    pos = sp.positions()[None]
    n = pos.shape[1]
    q, k, v = (torch.randn(1, 4, n, 8) for _ in range(3))
    states = [pe.prepare(p) for p in (pos, pos + offset)]
    idx = (
        torch.zeros(1, 1, 1, 1, dtype=torch.long),
        torch.arange(4).view(1, 4, 1, 1),
        torch.arange(n).view(1, 1, n, 1),
        torch.arange(n).view(1, 1, 1, n),
    )
    biases = [pe.score_mod(s, 0)(torch.zeros(()), *idx) for s in states]
    torch.testing.assert_close(biases[1], biases[0], rtol=0, atol=0)
    with torch.no_grad():  # FlexAttention has no CPU backward
        out = [pe.attend(q, k, v, s, 0, causal=True) for s in states]
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("method", "extent", "spacing", "built"),
    [
        ("alibi", [4000], "even", "window"),  # text: every block is a window of the last block's bias
        ("alibi", [4000], "gaps", "blocks"),  # not evenly spaced: one bias per block
        ("alibi_nd", [40, 40], "raster", "blocks"),  # a 2-D raster is not evenly spaced in both coordinates
    ],
)
def test_long_causal_attention_in_blocks_equals_the_whole_square(
    method: str, extent: list[int], spacing: str, built: str
) -> None:
    """Past 2 × CAUSAL_BLOCK tokens the bias path runs a block of queries at a time over the keys it may
    see; it must equal the one-square computation (the dense bias over every query and key, masked)."""
    from seqpe_nd.encodings.base import CAUSAL_BLOCK, materialize_score_mod, sdpa

    torch.manual_seed(0)
    pe = build(method, space(extent), backend="bias")
    n = 2 * CAUSAL_BLOCK + 77
    sp = space(extent)
    pos = sp.positions(sp.L).reshape(-1, len(extent))[:n][None].repeat(2, 1, 1)
    if spacing == "even":
        pos = pos * 3  # step 3
    elif spacing == "gaps":
        pos[:, n // 2 :] += 5
    pos[1] += 7  # rows start elsewhere
    q, k, v = (torch.randn(2, pe.num_heads, n, 8) for _ in range(3))
    with torch.no_grad():
        state = pe.prepare(pos)
        got = pe.attend(q, k, v, state, 0, causal=True)
        bias = materialize_score_mod(pe.score_mod(state, 0), 2, pe.num_heads, n, n, q.device)
        bias = bias.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        want = sdpa(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(key[0] == "bias" for key in state._memo)  # no square bias was built
    blocks = [b for key, b in state._memo.items() if key[0] == "bias-block"]
    windows = [b for key, b in state._memo.items() if key[0] == "bias-window"]
    if built == "window":  # one row, the last block's queries against every key
        assert blocks == [] and [w.shape for w in windows] == [(1, pe.num_heads, CAUSAL_BLOCK, n)]
    else:
        assert windows == []
        assert [b.shape[-2:] for b in blocks] == [(512, 512), (512, 1024), (77, n)]  # each block sees keys up to its end

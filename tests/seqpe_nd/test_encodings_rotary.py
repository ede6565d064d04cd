"""Rotary encodings against Hugging Face's and timm's implementations and naive loops."""

import itertools
import math

import pytest
import torch
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingMixed,
    apply_rot_embed_cat,
    init_random_2d_freqs,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.functional import init_mixed_freqs
from seqpe_nd.positions import load_space


def space(extent: list[int]):
    return load_space({"L": extent, "L_max": [e * 1000 for e in extent]})


def build(method: str, extent: list[int], heads: int = 2, head_dim: int = 16, layers: int = 2, **cfg):
    return build_position_encoding(
        {"method": method, **cfg},
        space=space(extent),
        num_heads=heads,
        head_dim=head_dim,
        num_layers=layers,
        d_model=heads * head_dim,
    )


@pytest.mark.parametrize("base", [10_000.0, 500.0, 1_000_000.0])
def test_rope_equals_transformers(base: float) -> None:
    torch.manual_seed(0)
    b, h, n, e = 2, 3, 37, 16
    pe = build("rope", [64], heads=h, head_dim=e, base=base)
    pos = torch.stack([torch.arange(n), torch.arange(900, 900 + n)])[..., None]  # a shifted row too
    q, k = torch.randn(b, h, n, e), torch.randn(b, h, n, e)
    got_q, got_k = pe.transform_qk(q, k, pe.prepare(pos), 0)

    hf = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=h * e, num_attention_heads=h, rope_parameters={"rope_type": "default", "rope_theta": base}
        )
    )
    cos, sin = hf(q, pos[..., 0])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_rope_axial_equals_timm_in_2d() -> None:
    torch.manual_seed(0)
    h, e, (gh, gw) = 2, 16, (5, 7)
    pe = build("rope_axial", [gh, gw], heads=h, head_dim=e, base=100.0)
    pos = space([gh, gw]).positions()[None]  # row-major (row, col)
    q, k = torch.randn(1, h, gh * gw, e), torch.randn(1, h, gh * gw, e)
    got_q, got_k = pe.transform_qk(q, k, pe.prepare(pos), 0)

    timm_rope = RotaryEmbeddingCat(e, temperature=100.0, in_pixels=False)
    emb = timm_rope.get_embed([gh, gw])  # (N, 2e) = [sin | cos], interleaved pairs
    torch.testing.assert_close(got_q, apply_rot_embed_cat(q, emb))
    torch.testing.assert_close(got_k, apply_rot_embed_cat(k, emb))


def naive_axial(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pair (2j, 2j+1) of axis block a by p_a / base^(j/f), written as loops."""
    n, e = x.shape[-2:]
    w = pos.shape[-1]
    f = e // (2 * w)
    out = x.clone()
    for t, a, j in itertools.product(range(n), range(w), range(f)):
        ang = float(pos[t, a]) / base ** (j / f)
        c, s = math.cos(ang), math.sin(ang)
        i0 = 2 * (a * f + j)
        x0, x1 = x[..., t, i0], x[..., t, i0 + 1]
        out[..., t, i0], out[..., t, i0 + 1] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


@pytest.mark.parametrize("extent", [[9], [3, 4], [2, 3, 2]])
def test_rope_axial_equals_loops(extent: list[int]) -> None:
    torch.manual_seed(0)
    e = 12
    pe = build("rope_axial", extent, heads=1, head_dim=e, base=50.0)
    pos = space(extent).positions()[None] + 3
    q = torch.randn(1, 1, pos.shape[1], e, dtype=torch.float64)
    got, _ = pe.transform_qk(q, q, pe.prepare(pos), 0)
    torch.testing.assert_close(got, naive_axial(q, pos[0], 50.0), rtol=1e-5, atol=1e-5)


def test_rope_mixed_init_equals_timm() -> None:
    torch.manual_seed(0)
    want = init_random_2d_freqs(16, 1, 4, temperature=10.0)[:, 0]  # (2, h, e/2)
    torch.manual_seed(0)
    got = init_mixed_freqs(2, 4, 16, 10.0)  # (w, h, e/2)
    torch.testing.assert_close(got, want)


def test_rope_mixed_equals_timm() -> None:
    torch.manual_seed(0)
    h, e, layers, (gh, gw) = 3, 16, 2, (4, 6)
    pe = build("rope_mixed", [gh, gw], heads=h, head_dim=e, layers=layers)
    timm_rope = RotaryEmbeddingMixed(h * e, depth=layers, num_heads=h, temperature=10.0)
    with torch.no_grad():
        # timm's axis 0 multiplies x (the column, 'xy' grid); ours multiplies pos[..., 0] (the row).
        pe.freqs.copy_(timm_rope.freqs.flip(0).transpose(0, 1))
    emb = timm_rope.get_embed([gh, gw])  # (depth, h, N, 2e)
    pos = space([gh, gw]).positions()[None].expand(2, -1, -1)
    state = pe.prepare(pos)
    for layer in range(layers):
        q, k = torch.randn(2, h, gh * gw, e), torch.randn(2, h, gh * gw, e)
        got_q, got_k = pe.transform_qk(q, k, state, layer)
        torch.testing.assert_close(got_q, apply_rot_embed_cat(q, emb[layer]))
        torch.testing.assert_close(got_k, apply_rot_embed_cat(k, emb[layer]))


def test_rope_mixed_per_layer_option_reaches_the_frequencies() -> None:
    assert build("rope_mixed", [3, 3], layers=3, per_layer=True).freqs.shape[0] == 3
    shared = build("rope_mixed", [3, 3], layers=3, per_layer=False)
    assert shared.freqs.shape[0] == 1
    pos = space([3, 3]).positions()[None]
    q = torch.randn(1, 2, 9, 16)
    state = shared.prepare(pos)
    torch.testing.assert_close(shared.transform_qk(q, q, state, 0), shared.transform_qk(q, q, state, 2))


def test_rope_axial_in_1d_gives_rope_scores() -> None:
    """Same frequencies, different pair layout (timm interleaved vs HF halves): with the head dim
    permuted to match (pair (j, j + e/2) ↔ pair (2j, 2j + 1)), the same q·k."""
    torch.manual_seed(0)
    pos = torch.arange(20)[None, :, None]
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    perm = torch.stack([torch.arange(8), torch.arange(8) + 8], dim=-1).flatten()
    scores = []
    for method, idx in (("rope", torch.arange(16)), ("rope_axial", perm)):
        pe = build(method, [20], base=10_000.0)
        rq, rk = pe.transform_qk(q[..., idx], k[..., idx], pe.prepare(pos), 0)
        scores.append(rq @ rk.transpose(-1, -2))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "extent"),
    [
        ("rope", [16]),
        ("rope_axial", [16]),
        ("rope_axial", [4, 4]),
        ("rope_axial", [2, 2, 3]),
        ("rope_mixed", [16]),
        ("rope_mixed", [4, 4]),
        ("rope_mixed", [2, 2, 3]),
    ],
)
def test_rotary_scores_are_shift_invariant(method: str, extent: list[int]) -> None:
    torch.manual_seed(0)
    pe = build(method, extent, head_dim=12)
    pos = space(extent).positions()[None]
    q, k = (
        torch.randn(1, 2, pos.shape[1], 12, dtype=torch.float64),
        torch.randn(1, 2, pos.shape[1], 12, dtype=torch.float64),
    )
    z = torch.tensor([7, 300, 41][: len(extent)])

    def scores(p: torch.Tensor) -> torch.Tensor:
        rq, rk = pe.transform_qk(q, k, pe.prepare(p), 0)
        return rq @ rk.transpose(-1, -2)

    torch.testing.assert_close(scores(pos + z), scores(pos), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "ndim", "head_dim"), [("rope_axial", 3, 16), ("rope_mixed", 3, 20), ("rope", 1, 15)]
)
def test_rotary_refuses_head_dims_the_axes_cannot_split(method: str, ndim: int, head_dim: int) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        build(method, [2] * ndim, head_dim=head_dim)

"""The PositionEncoding interface: every method through the same three hooks and attend()."""

import pytest
import torch

from seqpe_nd.encodings import METHODS, KVCache, PEState, build_position_encoding, load_pe_config, visibility_mask
from seqpe_nd.positions import load_space

HEADS, HEAD_DIM, LAYERS, D = 2, 12, 2, 24


def grid(ndim: int):
    extent = {1: [12], 2: [3, 4], 3: [2, 2, 3]}[ndim]
    return load_space({"L": extent, "L_max": [e * 4 for e in extent]})


def config(method: str) -> dict:
    cfg: dict = {"method": method}
    if method == "seqpe":
        cfg.update(hidden=16, layers=1, heads=2, dropout=0.0)
    return cfg


def exists(method: str, ndim: int) -> bool:
    """The method is defined on an ``ndim``-D grid (its config's own rule)."""
    return load_pe_config({"method": method}).unsupported(grid(ndim)) is None


CASES = [(m, n) for m in METHODS for n in (1, 2, 3) if exists(m, n)]


@pytest.mark.parametrize(("method", "ndim"), CASES)
def test_every_method_runs_through_the_hooks(method: str, ndim: int) -> None:
    torch.manual_seed(0)
    space = grid(ndim)
    pe = build_position_encoding(
        config(method), space=space, num_heads=HEADS, head_dim=HEAD_DIM, num_layers=LAYERS, d_model=D
    )
    pos = space.positions()[None].expand(2, -1, -1)
    state = pe.prepare(pos, generator=torch.Generator().manual_seed(0))
    assert isinstance(state, PEState)
    emb = pe.embed(state)
    assert emb is None or emb.shape == (2, pos.shape[1], D)
    q = torch.randn(2, HEADS, pos.shape[1], HEAD_DIM, requires_grad=True)
    out = q
    for layer in range(LAYERS):
        out = pe.attend(out, out, out, state, layer, causal=True)
    assert out.shape == q.shape and bool(out.isfinite().all())
    loss = (
        out.square().sum()
        + (0 if state.aux_loss is None else state.aux_loss)
        + (0 if emb is None else emb.square().sum())
    )
    loss.backward()
    assert q.grad is not None and bool(q.grad.isfinite().all())
    trainable = [p for p in pe.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), "every parameter of the encoding gets a gradient"


@pytest.mark.parametrize(
    ("method", "ndim"), [(m, n) for m, n in [("rope", 2), ("rope", 3), ("alibi", 2), ("alibi", 3)]]
)
def test_one_d_methods_refuse_grids_and_say_what_to_use(method: str, ndim: int) -> None:
    hint = "rope_axial" if method == "rope" else "alibi_nd"
    with pytest.raises(ValueError, match=hint):
        build_position_encoding(
            {"method": method}, space=grid(ndim), num_heads=2, head_dim=12, num_layers=1, d_model=24
        )


def test_visibility_mask_aligns_queries_to_the_end_of_the_keys() -> None:
    # A cached step: 2 new queries after 3 cached keys see keys 0..3 and 0..4 (bottom-right).
    got = visibility_mask(2, 5, causal=True, key_padding_mask=None, device=torch.device("cpu"))
    assert got is not None
    want = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(got[0, 0], want)
    assert visibility_mask(4, 4, causal=True, key_padding_mask=None, device=torch.device("cpu")) is None  # is_causal
    # One decoding query is the last token: it sees every key, so there is nothing to mask.
    assert visibility_mask(1, 5, causal=True, key_padding_mask=None, device=torch.device("cpu")) is None
    padded = visibility_mask(1, 3, causal=True, key_padding_mask=torch.tensor([[False, True, True]]),
                             device=torch.device("cpu"))
    assert padded is not None and padded[0, 0, 0].tolist() == [False, True, True]


def test_kv_cache_accumulates_positions_masks_and_keys() -> None:
    cache = KVCache()
    pos, mask = cache.extend(torch.zeros(1, 3, 1, dtype=torch.long))
    assert pos.shape == (1, 3, 1) and mask is None
    pos, mask = cache.extend(torch.ones(1, 1, 1, dtype=torch.long), torch.tensor([[False]]))
    assert pos.shape == (1, 4, 1) and mask is not None and mask.tolist() == [[True, True, True, False]]
    k, v = cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    k, v = cache.update(0, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert k.shape == (1, 2, 4, 4) and len(cache) == 4

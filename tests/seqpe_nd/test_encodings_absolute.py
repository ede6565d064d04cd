"""Absolute encodings: sinusoids from their formula, learned tables and their resampling."""

import math

import pytest
import torch
from timm.layers.pos_embed import resample_abs_pos_embed

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.absolute import APELearn
from seqpe_nd.positions import load_space


def space(extent: list[int]):
    return load_space({"L": extent, "L_max": [e * 100 for e in extent]})


def build(method: str, extent: list[int], d: int = 12, **cfg):
    return build_position_encoding(
        {"method": method, **cfg}, space=space(extent), num_heads=2, head_dim=d // 2, num_layers=1, d_model=d
    )


@pytest.mark.parametrize("scale", [None, 0.02 * math.sqrt(2)])
@pytest.mark.parametrize("extent", [[5], [2, 3], [2, 2, 2]])
def test_ape_sin_is_per_axis_vaswani(extent: list[int], scale: float | None) -> None:
    d = 12
    pe = build("ape_sin", extent, d=d, base=1000.0, **({} if scale is None else {"scale": scale}))
    amp = 1.0 if scale is None else scale  # unset: the formula itself
    pos = space(extent).positions()[None] + 40_000  # far beyond any training extent: no table
    got = pe.embed(pe.prepare(pos))[0]
    w = len(extent)
    da = d // w
    for t in range(pos.shape[1]):
        for a in range(w):
            for i in range(da // 2):
                ang = float(pos[0, t, a]) / 1000.0 ** (2 * i / da)
                assert got[t, a * da + 2 * i].item() == pytest.approx(amp * math.sin(ang), abs=1e-6)
                assert got[t, a * da + 2 * i + 1].item() == pytest.approx(amp * math.cos(ang), abs=1e-6)


def test_ape_sin_refuses_widths_the_axes_cannot_split() -> None:
    with pytest.raises(ValueError, match="divisible by 6"):
        build("ape_sin", [2, 2, 2], d=16)


@pytest.mark.parametrize("extent", [[6], [3, 4], [2, 3, 2]])
def test_ape_learn_inside_the_table_reads_its_rows(extent: list[int]) -> None:
    pe = build("ape_learn", extent)
    assert isinstance(pe, APELearn)
    pos = space(extent).positions()[None]
    torch.testing.assert_close(pe.embed(pe.prepare(pos))[0], pe.table.reshape(-1, 12))


def lerp_1d(table: torch.Tensor, size: int) -> torch.Tensor:
    """Linear resampling, align_corners=False, written out: source x = (i + ½)·L/L' − ½."""
    n = table.shape[0]
    out = []
    for i in range(size):
        x = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, n - 1)
        out.append(table[lo] * (1 - (x - lo)) + table[hi] * (x - lo))
    return torch.stack(out)


def test_ape_learn_1d_extends_linearly_beyond_its_table() -> None:
    pe = build("ape_learn", [8])
    pos = torch.arange(20)[None, :, None]  # 20 positions from an 8-row table
    torch.testing.assert_close(pe.embed(pe.prepare(pos))[0], lerp_1d(pe.table.detach(), 20))


def test_ape_learn_2d_resamples_like_timm() -> None:
    pe = build("ape_learn", [4, 4])
    pos = space([7, 7]).positions()[None]
    want = resample_abs_pos_embed(
        pe.table.detach().reshape(1, 16, 12), [7, 7], old_size=[4, 4], num_prefix_tokens=0
    )  # bicubic, antialias
    torch.testing.assert_close(pe.embed(pe.prepare(pos)), want)


def test_ape_learn_3d_trilinear_is_separable_linear() -> None:
    pe = build("ape_learn", [3, 2, 2])
    table = pe.table.detach()
    want = table
    for axis, size in enumerate((5, 3, 4)):  # trilinear = linear along each axis in turn
        want = lerp_1d(want.movedim(axis, 0), size).movedim(0, axis)
    pos = space([5, 3, 4]).positions()[None]
    torch.testing.assert_close(pe.embed(pe.prepare(pos))[0], want.reshape(-1, 12), rtol=1e-5, atol=1e-5)


def test_ape_learn_resize_modes_and_options() -> None:
    grow = build("ape_learn", [4, 4], resize="grow")
    exact = build("ape_learn", [4, 4], resize="exact", interpolation="bilinear")
    with torch.no_grad():
        exact.table.copy_(grow.table)
    small = space([2, 3]).positions()[None]
    torch.testing.assert_close(
        grow.embed(grow.prepare(small))[0], grow.table[:2, :3].reshape(-1, 12)
    )  # trained rows kept
    want = resample_abs_pos_embed(
        exact.table.detach().reshape(1, 16, 12), [2, 3], old_size=[4, 4], num_prefix_tokens=0, interpolation="bilinear"
    )
    torch.testing.assert_close(exact.embed(exact.prepare(small)), want)  # timm's dynamic size
    # One axis outgrown: only that axis is resampled under "grow".
    wide = space([4, 6]).positions()[None]
    got = grow.embed(grow.prepare(wide))[0].reshape(4, 6, 12)
    want = resample_abs_pos_embed(grow.table.detach().reshape(1, 16, 12), [4, 6], old_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(got, want.reshape(4, 6, 12))
    assert build("ape_learn", [4, 4], size=[5, 6]).table.shape == (5, 6, 12)
    assert build("ape_learn", [4], init_std=0.0).table.abs().sum() == 0


def test_ape_learn_rows_of_a_batch_resample_independently() -> None:
    pe = build("ape_learn", [8])
    pos = torch.stack([torch.arange(20), torch.cat([torch.arange(6), torch.zeros(14, dtype=torch.long)])])[..., None]
    got = pe.embed(pe.prepare(pos))
    torch.testing.assert_close(got[0], lerp_1d(pe.table.detach(), 20))
    torch.testing.assert_close(got[1, :6], pe.table[:6])  # the short row stays inside the table


def test_ape_learn_refuses_four_dims() -> None:
    with pytest.raises(ValueError, match="1-D, 2-D and 3-D"):
        build("ape_learn", [2, 2, 2, 2], d=16)

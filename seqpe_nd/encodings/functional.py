"""The math of the baseline position encodings, as plain functions (modules only hold buffers).

Legend: ``b`` batch, ``n`` tokens, ``w`` position width (axes), ``h`` heads, ``e`` head dim,
``d`` model dim, ``f`` rotary frequencies per axis.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Rotary (Su et al., RoFormer; axial: Heo et al. 2024; mixed: RoPE-Mixed, same paper)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(num: int, base: float) -> Float[Tensor, " f"]:
    """``1 / base^(i/num)`` for ``i < num``: in 1-D with ``num = e/2`` this is RoFormer's θ_i.

    In float32 with one rounding per step, as Hugging Face and timm compute it (bit-identical)."""
    return 1.0 / (base ** (torch.arange(num, dtype=torch.float32) / num))


def axial_angles(pos: Int[Tensor, "b n w"], inv_freq: Float[Tensor, " f"]) -> Float[Tensor, "b n wf"]:
    """Per-axis angles ``p_a · θ_i``, axis blocks concatenated: the head dim is split across axes."""
    return (pos.float()[..., None] * inv_freq.to(pos.device)).flatten(-2)  # (b, n, w*f)


def mixed_angles(pos: Int[Tensor, "b n w"], freqs: Float[Tensor, "w h f"]) -> Float[Tensor, "b h n f"]:
    """RoPE-Mixed angles ``Σ_a p_a · θ_{a,h,i}``: learnable frequencies mix the axes per head."""
    # Outer products as broadcasts, in float32 even under autocast (as timm's get_mixed_freqs).
    return (pos.float()[:, None, :, :, None] * freqs.float().transpose(0, 1)[None, :, None]).sum(-2)  # (b, h, n, f)


def init_mixed_freqs(
    ndim: int, num_heads: int, head_dim: int, base: float, generator: torch.Generator | None = None
) -> Float[Tensor, "w h f"]:
    """RoPE-Mixed's initial frequencies: per head, ``ndim`` random orthogonal directions, each
    carrying the magnitudes ``1 / base^(2·ndim·i/e)``.

    In 2-D the directions are the angles θ and θ + π/2 with θ ~ U[0, 2π), exactly as Heo et al.
    (timm's ``init_random_2d_freqs``); in other dims a Haar-random orthogonal matrix.
    """
    if head_dim % (2 * ndim):
        raise ValueError(f"rope_mixed in {ndim}-D needs head_dim divisible by {2 * ndim}, got {head_dim}")
    mag = 1.0 / base ** (torch.arange(0, head_dim, 2 * ndim, dtype=torch.float32) / head_dim)  # (f/ndim,)
    if ndim == 2:
        theta = torch.rand(num_heads, 1, generator=generator) * 2 * math.pi
        rot = torch.stack(
            [
                torch.stack([theta.cos(), (theta + math.pi / 2).cos()], -1),
                torch.stack([theta.sin(), (theta + math.pi / 2).sin()], -1),
            ],
            1,
        )[:, :, 0]  # (h, axis, dir)
    else:
        qr, r = torch.linalg.qr(torch.randn(num_heads, ndim, ndim, generator=generator))
        rot = qr * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar: fix QR's signs
    # freqs[a, h, j*F + i] = rot[h, a, j] · mag[i]: direction j's block of magnitudes.
    return (rot[..., None] * mag).flatten(-2).permute(1, 0, 2).contiguous()  # (w, h, f)


def rotary_cos_sin(
    angles: Float[Tensor, "*b f"], *, interleaved: bool
) -> tuple[Float[Tensor, "*b e"], Float[Tensor, "*b e"]]:
    """cos and signed sin in the layout ``apply_rotary`` expects: ``[f0, f0, f1, f1, …]``
    (interleaved pairs, timm) or ``[f0, f1, …, f0, f1, …]`` (halves, Hugging Face / GPT-NeoX).

    The sin carries the rotation's sign (``-sin`` on the first member of each pair), so that
    ``apply_rotary`` is two products and a sum: ``x·cos + swap(x)·sin``."""
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def swap_pairs(x: Float[Tensor, "*b e"], *, interleaved: bool) -> Float[Tensor, "*b e"]:
    """Each rotation pair's two members exchanged: (x_{2i}, x_{2i+1}) (interleaved) or (x_i, x_{i+e/2})."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, dims=-1)


def apply_rotary(
    x: Float[Tensor, "b h n e"], cos: Float[Tensor, "b #h n e"], sin: Float[Tensor, "b #h n e"], *, interleaved: bool  # noqa: F821 (jaxtyping's '#')
) -> Float[Tensor, "b h n e"]:
    """``R_Θ,p x`` with ``rotary_cos_sin``'s tables, computed in float32 and cast back once
    (each pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``)."""
    xf = x.float()
    return torch.addcmul(xf * cos, swap_pairs(xf, interleaved=interleaved), sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Absolute encodings (Vaswani et al.; learned tables with resampling as timm / the paper)
# ---------------------------------------------------------------------------------------------


def sinusoid(pos: Int[Tensor, "b n w"], dim: int, base: float = 10_000.0) -> Float[Tensor, "b n d"]:
    """Per-axis sinusoids concatenated: ``dim/w`` channels per axis, each Vaswani's
    ``[sin(p/base^(2i/d_a)), cos(p/base^(2i/d_a))]`` pairs. Computed from positions (float64
    angles), so no table can run out."""
    w = pos.shape[-1]
    if dim % (2 * w):
        raise ValueError(f"ape_sin in {w}-D needs d_model divisible by {2 * w}, got {dim}")
    per_axis = dim // w
    inv = 1.0 / base ** (torch.arange(0, per_axis, 2, dtype=torch.float64, device=pos.device) / per_axis)  # (d_a/2,)
    ang = pos.double()[..., None] * inv  # (b, n, w, d_a/2)
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-3).float()  # (b, n, w*d_a)


INTERPOLATION_BY_NDIM = {1: "linear", 2: "bicubic", 3: "trilinear"}


def resample_table(table: Float[Tensor, "*g d"], size: Sequence[int], mode: str) -> Float[Tensor, "*s d"]:
    """A learned ``(*grid, d)`` table resized to ``size`` with ``align_corners=False`` (the paper's
    linear 1-D extension; timm's ``resample_abs_pos_embed`` for bicubic 2-D, antialias included)."""
    if tuple(size) == tuple(table.shape[:-1]):
        return table
    x = table.float().movedim(-1, 0)[None]  # (1, d, *grid)
    antialias = mode in ("bilinear", "bicubic")
    x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=antialias)
    return x[0].movedim(0, -1).to(table.dtype)


# ---------------------------------------------------------------------------------------------
# ALiBi (Press et al., 2022)
# ---------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> Float[Tensor, " h"]:
    """Press et al.'s head slopes: the geometric sequence starting at ``2^(-8/n)`` with that ratio;
    for ``n`` not a power of two, those of the closest smaller power plus every other slope of
    the next power (their reference code). Not divided by √d (the released code's bug)."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + slopes(2 * closest)[0::2][: n - closest]

    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    return torch.tensor(slopes(num_heads), dtype=torch.float32)

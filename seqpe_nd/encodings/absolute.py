"""Encodings added to the input embeddings: sinusoidal and learned APE (NoPE is the base class).

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``d`` model dim.
"""

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor, nn

from seqpe_nd.encodings.base import PEState, PositionEncoding
from seqpe_nd.encodings.functional import INTERPOLATION_BY_NDIM, resample_table, sinusoid
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.positions import GridSpace, HybridSpace


class NoPE(PositionEncoding):
    """No position information (Kazemnejad et al.); every hook is the base class's no-op."""

    method = "nope"


class APESin(PositionEncoding):
    """Sinusoidal APE (Vaswani et al., Eq. 4 of the paper), per-axis blocks concatenated in N-D."""

    method = "ape_sin"

    def __init__(
        self,
        *,
        d_model: int,
        base: float,
        scale: float = 1.0,
        num_heads: int,
        head_dim: int,
        num_layers: int,
        width: int,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        if d_model % (2 * width):
            raise ValueError(f"ape_sin in {width}-D needs d_model divisible by {2 * width}, got d_model = {d_model}")
        if not scale > 0:
            raise ValueError(f"ape_sin scale = {scale} is not allowed; it must be > 0")
        self.d_model, self.base, self.scale = d_model, base, scale

    def embed(self, state: PEState) -> Float[Tensor, "b n d"]:
        """Eq. 4: ``x_i + scale · e_i`` with ``e`` computed from the explicit positions."""
        e = sinusoid(state.pos_q, self.d_model, self.base)
        return e if self.scale == 1.0 else e * self.scale


Resize = Literal["grow", "exact"]


class APELearn(PositionEncoding):
    """Learned APE table of the training extent, resampled when positions reach beyond it.

    ``resize="grow"``: axes the positions outgrow are resampled to the positions' extent, the
    others keep their trained rows (a 512-row table read at 1024 tokens is stretched to 1024
    rows, as the paper's LM baseline); ``"exact"``: always resampled to the extent the positions
    span, also downwards (timm's ``dynamic_img_size``). The extent is taken per batch row from
    all key positions, so a padded row (pads at any valid position, e.g. 0) equals its unpadded
    self. Beyond the table the encoding depends on that extent by construction, so cached
    decoding equals the full forward only while positions stay inside the table.
    """

    method = "ape_learn"

    def __init__(
        self,
        *,
        d_model: int,
        size: Sequence[int],
        interpolation: str,
        resize: Resize,
        init_std: float,
        num_heads: int,
        head_dim: int,
        num_layers: int,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=len(size))
        self.size, self.interpolation, self.resize = tuple(size), interpolation, resize
        self.table = nn.Parameter(torch.randn(*self.size, d_model) * init_std)

    def target_size(self, pos: Int[Tensor, "b m w"]) -> Int[Tensor, "b w"]:
        """Grid each row is read from: its extent (``exact``), or at least the table (``grow``)."""
        extent = pos.amax(dim=1) + 1
        if self.resize == "exact":
            return extent
        return torch.maximum(extent, torch.tensor(self.size, device=pos.device))

    def embed(self, state: PEState) -> Float[Tensor, "b n d"]:
        """Rows of the (resampled) table at the query positions. Where the caller knows the positions' extent from
        shapes (``state.grid``: a ViT's patch grid), the grid is picked from it, with no value read."""
        if state.grid is not None:
            grid = state.grid if self.resize == "exact" else tuple(map(max, state.grid, self.size))
            return self._rows(grid, state.pos_q)
        if torch.compiler.is_compiling():
            return self._rows_of_trained_table(state)
        sizes = self.target_size(torch.cat([state.pos_q, state.pos_k], dim=1))
        out = self.table.new_empty(*state.pos_q.shape[:2], self.table.shape[-1])
        uniq, inverse = sizes.unique(dim=0, return_inverse=True)  # usually one grid per batch
        for u, size in enumerate(uniq.tolist()):
            rows = inverse == u
            out[rows] = self._rows(tuple(size), state.pos_q[rows])
        return out

    def _rows(self, grid: tuple[int, ...], pos: Int[Tensor, "*b w"]) -> Float[Tensor, "*b d"]:
        """Rows of the table resampled to ``grid`` at ``pos`` (a row-major flat index)."""
        table = resample_table(self.table, grid, self.interpolation).flatten(0, -2)  # (prod(grid), d)
        strides = torch.tensor([math.prod(grid[a + 1 :]) for a in range(len(grid))], device=pos.device)
        return table[(pos * strides).sum(-1)]

    def _rows_of_trained_table(self, state: PEState) -> Float[Tensor, "b n d"]:
        """Compiled, with an extent known only from values: the grid is a shape, so it must not depend on them. The
        table is read as it is, which is what eager does while the positions stay inside it (``grow``) or span
        it exactly (``exact``), as in training; positions elsewhere fail a check on the device (no host read,
        no sync): evaluate them uncompiled."""
        extent = torch.cat([state.pos_q, state.pos_k], dim=1).amax(dim=1) + 1  # (b, w)
        bound = torch.tensor(self.size, device=extent.device)
        fits = (extent <= bound).all() if self.resize == "grow" else (extent == bound).all()
        torch._assert_async(fits, "ape_learn compiled reads its table unresampled: positions must lie inside it "
                                  "(resize: grow) or span it (resize: exact); run other extents uncompiled")
        return self._rows(self.size, state.pos_q)


def default_interpolation(ndim: int) -> str:
    if ndim not in INTERPOLATION_BY_NDIM:
        raise ValueError(
            f"ape_learn resamples 1-D, 2-D and 3-D tables (torch.nn.functional.interpolate); got a {ndim}-D space"
        )
    return INTERPOLATION_BY_NDIM[ndim]


# --- configs ---------------------------------------------------------------------------------------

class NoPEConfig(MethodConfig):
    """No position encoding."""

    method: Literal["nope"] = "nope"

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return NoPE(width=space.width, **sizes.attention)


class APESinConfig(MethodConfig):
    """Sinusoidal APE added to the input embeddings; N-D: per-axis sinusoids concatenated."""

    method: Literal["ape_sin"] = "ape_sin"
    base: float = Field(10_000.0, gt=1.0)
    """Wavelength base of the sinusoids (Vaswani et al.: 10000)."""
    scale: float | None = Field(None, gt=0.0)
    """Amplitude of the sinusoids: ``e_i = scale · sin/cos(...)``; unset means 1.0 (the formula) in this factory.
    The LM and QA recipes set an unset scale to GPT-2's token-embedding scale, ``init_std · √2``: a
    sinusoid coordinate has RMS 1/√2, so this matches it to the N(0, init_std) token embeddings (0.0283 at
    0.02); at 1.0 the ±1 sinusoids are ~35× the tokens and swamp them. Give a value to override."""

    hybrid: ClassVar[bool] = False

    def for_embeddings(self, std: float) -> "APESinConfig":
        """An unset amplitude becomes ``std · √2``: the sinusoids' RMS (1/√2 per coordinate) matches the tokens'."""
        return self if self.scale is not None else self.model_copy(update={"scale": std * math.sqrt(2.0)})

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        scale = 1.0 if self.scale is None else self.scale
        return APESin(d_model=sizes.d_model, base=self.base, scale=scale, width=space.width, **sizes.attention)


class APELearnConfig(MethodConfig):
    """Learned APE table, resampled beyond its extent (linear 1-D, bicubic 2-D, trilinear 3-D)."""

    method: Literal["ape_learn"] = "ape_learn"
    size: tuple[PositiveInt, ...] | None = None
    """Table extent per axis; default the space's training extent L."""
    interpolation: Literal["auto", "nearest", "linear", "bilinear", "bicubic", "trilinear"] = "auto"
    """Resampling mode; auto = linear (1-D), bicubic (2-D), trilinear (3-D). align_corners=False."""
    resize: Literal["grow", "exact"] = "grow"
    """grow: resample only axes the positions outgrow; exact: always to the positions' extent (timm)."""
    init_std: float = Field(0.02, ge=0.0)
    """Std of the normal init of the table (GPT-2 / timm: 0.02)."""

    @field_validator("size", mode="before")
    @classmethod
    def _scalar_is_1d(cls, value: Any) -> Any:
        return (value,) if isinstance(value, int) else value

    hybrid: ClassVar[bool] = False

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        assert isinstance(space, GridSpace)
        size = self.size or space.L
        if len(size) != space.ndim:
            raise ValueError(f"ape_learn size {size} needs {space.ndim} entries for this {space.ndim}-D space")
        interpolation = default_interpolation(space.ndim) if self.interpolation == "auto" else self.interpolation
        table_ndim = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}.get(interpolation, space.ndim)
        if table_ndim != space.ndim:
            raise ValueError(
                f"ape_learn interpolation {interpolation!r} resamples {table_ndim}-D tables, "
                f"but the space is {space.ndim}-D; "
                f"use 'nearest' or 'auto' ({default_interpolation(space.ndim)})"
            )
        return APELearn(d_model=sizes.d_model, size=size, interpolation=interpolation, resize=self.resize,
                        init_std=self.init_std, **sizes.attention)

"""Rotary encodings: RoPE (1-D, any base), axial RoPE (N-D) and RoPE-Mixed (learnable frequencies).

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``h`` heads, ``e`` head
dim, ``f`` frequencies.

All three only rotate q and k (``R_Θ,i q_i · R_Θ,j k_j = q_i · R_Θ,j-i k_j``, the paper's §2), so
attention stays plain SDPA with its fused kernels.
"""

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from seqpe_nd.encodings.base import PEState, PositionEncoding
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.positions import Frozen, GridSpace, HybridSpace
from seqpe_nd.encodings.functional import (
    apply_rotary,
    axial_angles,
    init_mixed_freqs,
    mixed_angles,
    rope_inv_freq,
    rotary_cos_sin,
)


class _Rotary(PositionEncoding):
    """Shared plumbing: cos/sin per position set, memoised per forward (and per layer if learned)."""

    interleaved: bool = True
    # Subclasses define ``angles(pos, layer) -> Float[Tensor, "b #h n f"]``.

    def _set_scaling(self, scaling: Any, original_length: Sequence[int] | int | None) -> None:
        """Keep an evaluation-time ``scaling`` and the training extent per axis it is measured against."""
        if scaling is not None and original_length is None:
            raise ValueError(f"{self.method} scaling needs original_length (the training extent) or a grid space")
        if isinstance(original_length, int):
            original_length = (original_length,) * self.width
        if original_length is not None and len(original_length) != self.width:
            raise ValueError(f"original_length {list(original_length)} needs {self.width} entries, one per axis")
        self.scaling = scaling
        self.original_length = None if original_length is None else tuple(int(x) for x in original_length)

    def _layer_key(self, layer: int) -> int | None:
        return None  # fixed frequencies: one cos/sin for all layers

    def _cos_sin(self, state: PEState, pos: Tensor, side: str, layer: int) -> tuple[Tensor, Tensor]:
        key = ("rotary", side, pos.shape[1], self._layer_key(layer))
        return state.memo(key, lambda: rotary_cos_sin(self.angles(pos, layer), interleaved=self.interleaved))

    def transform_qk(
        self, q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h mk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h n e"], Float[Tensor, "b h mk e"]]:
        """``R_Θ,p`` applied to each query and key at its own position."""
        mk = k.shape[-2]
        cq, sq = self._cos_sin(state, state.pos_q, "q", layer)
        if mk == q.shape[-2] and state.keys_are_queries():  # a decoding step's new keys are its queries
            ck, sk = cq, sq
        else:
            ck, sk = self._cos_sin(state, state.pos_k[:, -mk:], "k", layer)
        return apply_rotary(q, cq, sq, interleaved=self.interleaved), apply_rotary(
            k, ck, sk, interleaved=self.interleaved
        )


class RoPEAxial(_Rotary):
    """Axial RoPE (Heo et al.'s RoPE2D, any dims): the head dim split evenly across axes, each
    block rotated by its own coordinate with ``θ_i = base^(-i/f)``; interleaved pairs as timm's
    ``RotaryEmbeddingCat``. In 1-D it is RoPE.

    With ``scaling``, a trained RoPE is extended at evaluation (never in training), one factor per
    axis (the config's, or the evaluated extent of that axis over its training extent, so a
    non-square change of resolution stretches each axis by its own amount): position interpolation
    (``linear``), NTK-aware base scaling (``ntk``), dynamic NTK (``dynamic``) or YaRN (``yarn``: a
    ramp between interpolated and original frequencies, and its attention temperature on cos/sin,
    taken from the product of the axes' factors). In 1-D each equals transformers' own ``rope_type``.
    """

    method = "rope_axial"

    def __init__(
        self, *, base: float, num_heads: int, head_dim: int, num_layers: int, width: int,
        scaling: Any = None, original_length: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        if head_dim % (2 * width):
            raise ValueError(
                f"{self.method} in {width}-D needs head_dim divisible by {2 * width}, got head_dim = {head_dim}"
            )
        self.base = base
        self.register_buffer("inv_freq", torch.empty(head_dim // (2 * width)), persistent=False)
        self.reset_buffers()
        self._set_scaling(scaling, original_length)

    def reset_buffers(self) -> None:
        """``inv_freq``, recomputed (a non-persistent buffer: see ``PositionEncoding.reset_buffers``)."""
        with torch.no_grad(), torch.device("cpu"):
            self.inv_freq.copy_(rope_inv_freq(self.inv_freq.shape[0], self.base))

    def angles(self, pos: Int[Tensor, "b n w"], layer: int) -> Float[Tensor, "b 1 n f"]:
        return axial_angles(pos, self.inv_freq)[:, None]  # (b, 1, n, e/2): same for every head

    def scaled(self, length: Sequence[int] | int) -> tuple[Float[Tensor, "w f"] | Float[Tensor, " f"], float]:
        """(inverse frequencies, cos/sin scale) for positions below ``length`` per axis: plain RoPE in training.

        1-D: the frequencies ``(f,)``; N-D: one row per axis ``(w, f)``.
        """
        lengths = (length,) * self.width if isinstance(length, int) else tuple(length)
        if self.scaling is None or self.training:
            inv = self.inv_freq.expand(self.width, -1)
            return (inv[0] if self.width == 1 else inv), 1.0
        assert self.original_length is not None
        rows, factors = [], []
        for n, L0 in zip(lengths, self.original_length, strict=True):
            inv, factor = self._scaled_axis(n, L0)
            rows.append(inv)
            factors.append(factor)
        s = self.scaling
        total = math.prod(factors)
        temperature = 1.0
        if s.type == "yarn":
            temperature = s.attention_factor if s.attention_factor is not None else (
                0.1 * math.log(total) + 1.0 if total > 1 else 1.0
            )
        inv = torch.stack(rows)
        return (inv[0] if self.width == 1 else inv), temperature

    def _scaled_axis(self, length: int, L0: int) -> tuple[Tensor, float]:
        """One axis: its inverse frequencies and its factor."""
        s, dim, device = self.scaling, self.head_dim // self.width, self.inv_freq.device
        factor = s.factor if s.factor is not None else max(1.0, length / L0)
        if s.type == "linear":
            return self.inv_freq / factor, factor
        if s.type == "ntk":
            return rope_inv_freq(dim // 2, self.base * factor ** (dim / (dim - 2))).to(device), factor
        if s.type == "dynamic":  # the factor of each forward's own length (transformers' "dynamic")
            f = s.factor if s.factor is not None else 1.0
            seq = max(length, L0)
            return rope_inv_freq(dim // 2, self.base * ((f * seq / L0) - (f - 1)) ** (dim / (dim - 2))).to(device), factor

        def correction(rotations: float) -> float:  # YaRN: the dimension that makes this many rotations over L0
            return (dim * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(self.base))

        low, high = max(math.floor(correction(s.beta_fast)), 0), min(math.ceil(correction(s.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        keep = (1 - ramp).to(device)  # 1: extrapolate (the original frequency), 0: interpolate
        return self.inv_freq / factor * (1 - keep) + self.inv_freq * keep, factor

    def _cos_sin(self, state: PEState, pos: Tensor, side: str, layer: int) -> tuple[Tensor, Tensor]:
        if self.scaling is None:
            return super()._cos_sin(state, pos, side, layer)

        def compute() -> tuple[Tensor, Tensor]:
            lengths = (0,) * self.width
            if not self.training:  # the evaluated extent of each axis
                top = torch.maximum(state.pos_q.amax(dim=(0, 1)), state.pos_k.amax(dim=(0, 1)))
                lengths = tuple(int(x) + 1 for x in top.tolist())
            inv, temperature = state.memo(("rope-scaling", lengths), lambda: self.scaled(lengths))
            inv = inv.reshape(self.width, -1)
            angles = (pos.float()[..., None] * inv.to(pos.device)).flatten(-2)[:, None]  # (b, 1, n, w*f)
            cos, sin = rotary_cos_sin(angles, interleaved=self.interleaved)
            return cos * temperature, sin * temperature

        return state.memo(("rotary", side, pos.shape[1], None), compute)


class RoPE(RoPEAxial):
    """RoPE (Su et al.) for 1-D positions, any base, in the Hugging Face / GPT-NeoX half layout
    (``scaling``: see :class:`RoPEAxial`)."""

    method = "rope"
    interleaved = False


class RoPEMixed(_Rotary):
    """RoPE-Mixed (Heo et al.): per head (and per layer unless shared) learnable frequency vectors
    ``θ_{h,i} ∈ R^w``, angle ``p · θ_{h,i}``, so axes mix; timm's ``RotaryEmbeddingMixed`` layout.

    Positions are taken as ``[B, H, N, e]`` throughout (the released baseline reshaped it as
    ``(B, N, H, e)``, scrambling positions across heads).
    """

    method = "rope_mixed"

    def __init__(
        self, *, base: float, per_layer: bool, num_heads: int, head_dim: int, num_layers: int, width: int,
        scaling: Any = None, original_length: Sequence[int] | int | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        self.base, self.per_layer = base, per_layer
        if scaling is not None and scaling.type != "linear":
            raise ValueError(
                f"rope_mixed scaling {scaling.type!r} is not defined on learned mixed frequencies; allowed: linear "
                "(position interpolation per axis)"
            )
        self._set_scaling(scaling, original_length)
        depth = num_layers if per_layer else 1
        self.freqs = nn.Parameter(
            torch.stack([init_mixed_freqs(width, num_heads, head_dim, base) for _ in range(depth)])
        )  # (depth, w, h, e/2)

    def _layer_key(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for {self.num_layers} layers")
        return layer if self.per_layer else 0

    def angles(self, pos: Int[Tensor, "b n w"], layer: int) -> Float[Tensor, "b h n f"]:
        freqs = self.freqs[self._layer_key(layer)]  # (w, h, f)
        if self.scaling is not None and not self.training:  # position interpolation, each axis by its own factor
            freqs = freqs / self.axis_factors(pos).to(freqs)[:, None, None]
        return mixed_angles(pos, freqs)

    def axis_factors(self, pos: Int[Tensor, "b n w"]) -> Float[Tensor, " w"]:
        """Each axis's factor: the config's, or the evaluated extent over the training extent (at least 1)."""
        assert self.original_length is not None
        if self.scaling.factor is not None:
            return torch.full((self.width,), float(self.scaling.factor))
        extent = pos.reshape(-1, self.width).amax(0).float().cpu() + 1
        return (extent / torch.tensor(self.original_length, dtype=torch.float32)).clamp_min(1.0)


# --- configs ---------------------------------------------------------------------------------------

class RoPEScaling(Frozen):
    """Context extension of a trained RoPE, applied in evaluation only (training sees plain RoPE)."""

    type: Literal["linear", "ntk", "dynamic", "yarn"]
    """``linear``: position interpolation (Chen et al.); ``ntk``: NTK-aware base scaling; ``dynamic``: NTK
    with the factor of each forward's length (transformers' ``dynamic``); ``yarn``: YaRN's ramp between
    interpolated and original frequencies, with its attention temperature (Peng et al.)."""
    factor: float | None = Field(None, ge=1.0)
    """Context extension factor; None: the evaluated length over ``original_length`` (at least 1), per forward."""
    original_length: PositiveInt | tuple[PositiveInt, ...] | None = None
    """The training extent (per axis for rope_axial); None: the space's L."""
    beta_fast: float = Field(32.0, gt=0)
    """YaRN: rotations above which a frequency is kept (extrapolated)."""
    beta_slow: float = Field(1.0, gt=0)
    """YaRN: rotations below which a frequency is interpolated."""
    attention_factor: float | None = Field(None, gt=0)
    """YaRN: scale of cos/sin (the attention temperature); None: ``0.1 ln(factor) + 1``."""


class RoPEConfig(MethodConfig):
    """RoPE on 1-D positions (use rope_axial or rope_mixed for N-D)."""

    method: Literal["rope"] = "rope"
    base: float = Field(10_000.0, gt=1.0)
    """Frequency base θ; larger rotates slower."""
    scaling: RoPEScaling | None = None
    """Context extension at evaluation: position interpolation, NTK, dynamic NTK or YaRN; None: plain RoPE."""

    dims: ClassVar[int | None] = 1
    hybrid: ClassVar[bool] = False
    instead: ClassVar[str] = "use rope_axial (axes split) or rope_mixed (learned mixing)"

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return RoPE(base=self.base, width=1, scaling=self.scaling, original_length=original_length(self, space),
                    **sizes.attention)


class RoPEAxialConfig(MethodConfig):
    """Axial RoPE (Heo et al. RoPE2D, any dims): head dim split across axes."""

    method: Literal["rope_axial"] = "rope_axial"
    base: float = Field(100.0, gt=1.0)
    """Frequency base; Heo et al. use 100 for ViTs (10000 makes it RoPE in 1-D)."""
    scaling: RoPEScaling | None = None
    """Context extension at evaluation, one factor per axis (evaluated extent / training extent unless given)."""

    hybrid: ClassVar[bool] = False

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return RoPEAxial(base=self.base, width=space.width, scaling=self.scaling,
                         original_length=original_length(self, space), **sizes.attention)


class RoPEMixedConfig(MethodConfig):
    """RoPE-Mixed (Heo et al.): learnable per-head frequency vectors mixing the axes."""

    method: Literal["rope_mixed"] = "rope_mixed"
    base: float = Field(10.0, gt=1.0)
    """Base of the initial frequency magnitudes (Heo et al. and timm: 10)."""
    per_layer: bool = True
    """One set of frequencies per layer (Heo et al.), or one shared by all layers."""
    scaling: RoPEScaling | None = None
    """Position interpolation at evaluation (type linear only: the learned frequencies have no NTK/YaRN form),
    one factor per axis."""

    hybrid: ClassVar[bool] = False

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return RoPEMixed(base=self.base, per_layer=self.per_layer, width=space.width, scaling=self.scaling,
                         original_length=original_length(self, space), **sizes.attention)


def original_length(cfg: Any, space: GridSpace | HybridSpace) -> tuple[int, ...] | int | None:
    """The training extent a RoPE scaling extends: stated, else the grid space's L."""
    if cfg.scaling is None:
        return None
    if cfg.scaling.original_length is not None:
        return cfg.scaling.original_length
    return tuple(space.L) if isinstance(space, GridSpace) else None

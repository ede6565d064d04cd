"""Rotary encodings: RoPE (1-D, any base), axial RoPE (N-D) and RoPE-Mixed (learnable frequencies).

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``h`` heads, ``e`` head
dim, ``f`` frequencies.

All three only rotate q and k (``R_Θ,i q_i · R_Θ,j k_j = q_i · R_Θ,j-i k_j``, the paper's §2), so
attention stays plain SDPA with its fused kernels.
"""

import math
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from seqpe_nd.encodings.base import PEState, PositionEncoding
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
        if state.pos_k is state.pos_q and mk == q.shape[-2]:
            ck, sk = cq, sq
        else:
            ck, sk = self._cos_sin(state, state.pos_k[:, -mk:], "k", layer)
        return apply_rotary(q, cq, sq, interleaved=self.interleaved), apply_rotary(
            k, ck, sk, interleaved=self.interleaved
        )


class RoPEAxial(_Rotary):
    """Axial RoPE (Heo et al.'s RoPE2D, any dims): the head dim split evenly across axes, each
    block rotated by its own coordinate with ``θ_i = base^(-i/f)``; interleaved pairs as timm's
    ``RotaryEmbeddingCat``. In 1-D it is RoPE."""

    method = "rope_axial"

    def __init__(self, *, base: float, num_heads: int, head_dim: int, num_layers: int, width: int) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        if head_dim % (2 * width):
            raise ValueError(
                f"{self.method} in {width}-D needs head_dim divisible by {2 * width}, got head_dim = {head_dim}"
            )
        self.base = base
        self.register_buffer("inv_freq", rope_inv_freq(head_dim // (2 * width), base), persistent=False)

    def angles(self, pos: Int[Tensor, "b n w"], layer: int) -> Float[Tensor, "b 1 n f"]:
        return axial_angles(pos, self.inv_freq)[:, None]  # (b, 1, n, e/2): same for every head


class RoPE(RoPEAxial):
    """RoPE (Su et al.) for 1-D positions, any base, in the Hugging Face / GPT-NeoX half layout.

    With ``scaling``, a trained RoPE is extended at evaluation (never in training): position
    interpolation (``linear``), NTK-aware base scaling (``ntk``), dynamic NTK (``dynamic``) or YaRN
    (``yarn``: a ramp between interpolated and original frequencies, and its attention temperature on
    cos/sin), each as transformers computes it; the factor is the config's, or the evaluated length
    over the training length.
    """

    method = "rope"
    interleaved = False

    def __init__(
        self, *, base: float, num_heads: int, head_dim: int, num_layers: int, width: int,
        scaling: Any = None, original_length: int | None = None,
    ) -> None:
        super().__init__(base=base, num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        if scaling is not None and original_length is None:
            raise ValueError("rope scaling needs original_length (the training length) or a grid space to take it from")
        self.scaling, self.original_length = scaling, original_length

    def scaled(self, length: int) -> tuple[Float[Tensor, " f"], float]:
        """(inverse frequencies, cos/sin scale) for positions below ``length``: plain RoPE in training."""
        s, dim = self.scaling, self.head_dim
        if s is None or self.training:
            return self.inv_freq, 1.0
        assert self.original_length is not None
        L0 = self.original_length
        factor = s.factor if s.factor is not None else max(1.0, length / L0)
        device = self.inv_freq.device
        if s.type == "linear":
            return self.inv_freq / factor, 1.0
        if s.type == "ntk":
            return rope_inv_freq(dim // 2, self.base * factor ** (dim / (dim - 2))).to(device), 1.0
        if s.type == "dynamic":  # the factor of each forward's own length (transformers' "dynamic")
            f = s.factor if s.factor is not None else 1.0
            seq = max(length, L0)
            return rope_inv_freq(dim // 2, self.base * ((f * seq / L0) - (f - 1)) ** (dim / (dim - 2))).to(device), 1.0
        # YaRN
        def correction(rotations: float) -> float:
            return (dim * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(self.base))

        low, high = max(math.floor(correction(s.beta_fast)), 0), min(math.ceil(correction(s.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        keep = (1 - ramp).to(device)  # 1: extrapolate (the original frequency), 0: interpolate
        inv = self.inv_freq / factor * (1 - keep) + self.inv_freq * keep
        temperature = s.attention_factor if s.attention_factor is not None else (
            0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        )
        return inv, temperature

    def _cos_sin(self, state: PEState, pos: Tensor, side: str, layer: int) -> tuple[Tensor, Tensor]:
        if self.scaling is None:
            return super()._cos_sin(state, pos, side, layer)

        def compute() -> tuple[Tensor, Tensor]:
            length = int(torch.maximum(state.pos_q.max(), state.pos_k.max())) + 1 if not self.training else 0
            inv, temperature = state.memo(("rope-scaling", length), lambda: self.scaled(length))
            cos, sin = rotary_cos_sin(axial_angles(pos, inv)[:, None], interleaved=self.interleaved)
            return cos * temperature, sin * temperature

        return state.memo(("rotary", side, pos.shape[1], None), compute)


class RoPEMixed(_Rotary):
    """RoPE-Mixed (Heo et al.): per head (and per layer unless shared) learnable frequency vectors
    ``θ_{h,i} ∈ R^w``, angle ``p · θ_{h,i}``, so axes mix; timm's ``RotaryEmbeddingMixed`` layout.

    Positions are taken as ``[B, H, N, e]`` throughout (the released baseline reshaped it as
    ``(B, N, H, e)``, scrambling positions across heads).
    """

    method = "rope_mixed"

    def __init__(
        self, *, base: float, per_layer: bool, num_heads: int, head_dim: int, num_layers: int, width: int
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        self.base, self.per_layer = base, per_layer
        depth = num_layers if per_layer else 1
        self.freqs = nn.Parameter(
            torch.stack([init_mixed_freqs(width, num_heads, head_dim, base) for _ in range(depth)])
        )  # (depth, w, h, e/2)

    def _layer_key(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for {self.num_layers} layers")
        return layer if self.per_layer else 0

    def angles(self, pos: Int[Tensor, "b n w"], layer: int) -> Float[Tensor, "b h n f"]:
        return mixed_angles(pos, self.freqs[self._layer_key(layer)])

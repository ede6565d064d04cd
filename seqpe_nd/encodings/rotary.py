"""Rotary encodings: RoPE (1-D, any base), axial RoPE (N-D) and RoPE-Mixed (learnable frequencies).

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``h`` heads, ``e`` head
dim, ``f`` frequencies.

All three only rotate q and k (``R_Θ,i q_i · R_Θ,j k_j = q_i · R_Θ,j-i k_j``, the paper's §2), so
attention stays plain SDPA with its fused kernels.
"""

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
    """RoPE (Su et al.) for 1-D positions, any base, in the Hugging Face / GPT-NeoX half layout."""

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

"""Multimodal rotary encoding (M-RoPE, Qwen2-VL): the layout of recent vision-language models.

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``a`` rotary axes,
``h`` heads, ``e`` head dim, ``f`` frequencies (``e/2``), ``g`` modalities, ``t`` timeline steps.

M-RoPE (Wang et al., "Qwen2-VL", 2024) keeps 1-D RoPE's frequencies ``θ_i = base^(-2i/e)`` and
the half layout, but hands each frequency band to one axis: the first ``sections[0]`` bands
rotate by the temporal id, the next ``sections[1]`` by the row id, and so on. Every token gets
one id per axis:

* text: the same id ``p`` on every axis, so a text-only sequence is exactly 1-D RoPE;
* an image segment starting at ``s``: ``(s, s + row, s + col)``; the text after it continues at
  ``s + max(H, W)`` (Qwen2-VL's ``get_rope_index``).

Here the ids are computed from a hybrid space's positions ``(modality, t, x_1..x_M)``
(:class:`~seqpe_nd.positions.HybridSpace`), where an image takes one timeline step: an image
anchored at ``t`` starts at ``s = t + Σ`` (``max_i x_i`` of every earlier image), i.e. each earlier
image widens the timeline by its largest local extent minus one. The offsets come from the key
positions (all of them, cached ones included), so queries decoded one at a time get the ids of
the full forward. On a grid space the ids are the coordinates themselves (1-D: RoPE).
"""

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt
from torch import Tensor

from seqpe_nd.encodings.base import PEState, PositionEncoding
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.encodings.functional import apply_rotary, rope_inv_freq, rotary_cos_sin
from seqpe_nd.positions import GridSpace, HybridSpace


def default_sections(num_freqs: int, axes: int) -> tuple[int, ...]:
    """Qwen2-VL's split ``[16, 24, 24]`` of 64 bands, scaled: the temporal/text axis gets a quarter,
    the local axes share the rest evenly (the remainder goes to the first axis)."""
    if axes == 1:
        return (num_freqs,)
    local = (3 * num_freqs) // (4 * (axes - 1))
    if local < 1:
        raise ValueError(
            f"mrope needs at least one frequency per axis: {num_freqs} frequencies cannot serve {axes} axes"
        )
    return (num_freqs - local * (axes - 1), *([local] * (axes - 1)))


def mrope_ids(
    pos: Int[Tensor, "b n w"], context: Int[Tensor, "b m w"], local_ndims: Int[Tensor, " g"]
) -> Int[Tensor, "b n a"]:
    """M-RoPE ids ``(s, s + x_1, …, s + x_M)`` of hybrid positions ``pos``.

    Args:
        context: the positions of the whole sequence (the keys); their images fix the offsets.
        local_ndims: local coordinates of each modality (0 for text, 2 for an image).
    """
    m_loc = pos.shape[-1] - 2
    axes = torch.arange(m_loc, device=pos.device)
    nd = local_ndims.to(pos.device)
    # Each image widens the timeline by max_i x_i (its ids reach s + max(H, W) - 1).
    has_c = axes < nd[context[..., 0]].unsqueeze(-1)  # (b, m, M)
    widen = torch.where(has_c, context[..., 2:], 0).amax(-1) if m_loc else torch.zeros_like(context[..., 0])  # (b, m)
    steps = int(max(int(context[..., 1].max()), int(pos[..., 1].max()))) + 1 if context.numel() and pos.numel() else 1
    extra = torch.zeros(pos.shape[0], steps, dtype=torch.int64, device=pos.device)
    extra = extra.scatter_reduce(1, context[..., 1].long(), widen.long(), reduce="amax", include_self=True)  # (b, t)
    before = extra.cumsum(-1) - extra  # widening by images anchored strictly earlier
    start = pos[..., 1].long() + before.gather(1, pos[..., 1].long())  # (b, n)
    has_q = axes < nd[pos[..., 0]].unsqueeze(-1)  # (b, n, M)
    local = torch.where(has_q, pos[..., 2:], 0).long()
    return torch.cat([start[..., None], start[..., None] + local], dim=-1)  # (b, n, 1 + M)


def mrope_angles(
    ids: Int[Tensor, "b n a"], inv_freq: Float[Tensor, " f"], sections: Sequence[int]
) -> Float[Tensor, "b n f"]:
    """Band ``i`` rotates by the id of the axis whose section holds it: ``ids[axis(i)] · θ_i``."""
    axis = torch.repeat_interleave(
        torch.arange(len(sections), device=ids.device), torch.tensor(list(sections), device=ids.device)
    )
    return ids.float().gather(-1, axis.expand(*ids.shape[:-1], -1)) * inv_freq.to(ids.device)  # (b, n, f)


class MultimodalRoPE(PositionEncoding):
    """M-RoPE (Qwen2-VL) on hybrid positions; on a grid space, one axis per coordinate."""

    method = "mrope"

    def __init__(
        self,
        *,
        space: GridSpace | HybridSpace,
        base: float,
        sections: Sequence[int] | None,
        num_heads: int,
        head_dim: int,
        num_layers: int,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=space.width)
        if head_dim % 2:
            raise ValueError(f"mrope needs an even head_dim, got head_dim = {head_dim}")
        self.hybrid = isinstance(space, HybridSpace)
        axes = 1 + space.local_ndim if isinstance(space, HybridSpace) else space.ndim
        f = head_dim // 2
        self.sections = tuple(sections) if sections is not None else default_sections(f, axes)
        if len(self.sections) != axes or sum(self.sections) != f or min(self.sections) < 1:
            raise ValueError(
                f"mrope sections {list(self.sections)} must give each of the {axes} axes at least one of the "
                f"head_dim/2 = {f} frequencies and sum to {f}"
            )
        self.base = base
        self._local_ndims = (
            [m.space.ndim if m.space.ndim > 1 else 0 for m in space.modalities]
            if isinstance(space, HybridSpace)
            else [0]
        )
        self.register_buffer("inv_freq", torch.empty(f), persistent=False)
        self.register_buffer("local_ndims", torch.empty(len(self._local_ndims), dtype=torch.int64), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """``inv_freq`` and ``local_ndims``, recomputed (non-persistent: see ``PositionEncoding.reset_buffers``)."""
        with torch.no_grad(), torch.device("cpu"):
            self.inv_freq.copy_(rope_inv_freq(self.inv_freq.shape[0], self.base))
            self.local_ndims.copy_(torch.tensor(self._local_ndims, dtype=torch.int64))

    def ids(self, pos: Int[Tensor, "b n w"], context: Int[Tensor, "b m w"]) -> Int[Tensor, "b n a"]:
        """Per-axis rotary ids of ``pos`` in a sequence whose positions are ``context``."""
        return mrope_ids(pos, context, self.local_ndims) if self.hybrid else pos.long()

    def fill_state(self, state: PEState, *, generator: torch.Generator | None, shifted: bool) -> None:
        """cos/sin of every query and key id, once per forward (the same for all layers)."""
        for side, pos in (("q", state.pos_q), ("k", state.pos_k)):
            if side == "k" and state.pos_k is state.pos_q:
                state.tensors["cos_k"], state.tensors["sin_k"] = state.tensors["cos_q"], state.tensors["sin_q"]
                continue
            angles = mrope_angles(self.ids(pos, state.pos_k), self.inv_freq, self.sections)
            state.tensors[f"cos_{side}"], state.tensors[f"sin_{side}"] = (
                t[:, None] for t in rotary_cos_sin(angles, interleaved=False)
            )

    def transform_qk(
        self, q: Float[Tensor, "b h n e"], k: Float[Tensor, "b h mk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h n e"], Float[Tensor, "b h mk e"]]:
        """Rotate each query and key by its per-band axis id (``k`` holds the LAST ``mk`` keys)."""
        mk = k.shape[-2]
        t = state.tensors
        q = apply_rotary(q, t["cos_q"], t["sin_q"], interleaved=False)
        k = apply_rotary(k, t["cos_k"][:, :, -mk:], t["sin_k"][:, :, -mk:], interleaved=False)
        return q, k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}, sections={list(self.sections)}"


class MultimodalRoPEConfig(MethodConfig):
    """M-RoPE (Qwen2-VL): RoPE's bands split across (time, row, col); text gets one id on every axis."""

    method: Literal["mrope"] = "mrope"
    base: float = Field(10_000.0, gt=1.0)
    """Frequency base θ, as 1-D RoPE (a text-only sequence is exactly RoPE)."""
    sections: tuple[PositiveInt, ...] | None = None
    """Frequency bands per axis (timeline first), summing to head_dim/2; default Qwen2-VL's 1/4, 3/8, 3/8 split."""

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return MultimodalRoPE(space=space, base=self.base, sections=self.sections, **sizes.attention)

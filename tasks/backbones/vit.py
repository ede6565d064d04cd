"""timm's VisionTransformer with any position encoding, at timm's own seams (no copied model code).

The adapter wraps a real timm model (``timm.create_model("vit_small_patch16_224", ...)`` or
``VisionTransformer(...)``); nothing of ``vision_transformer.py`` is copied. timm runs its own
forward (patch embedding, blocks, norm, head) and is touched at two seams:

- ``attn_layer=PEAttention``: timm's constructor argument for the attention class. PEAttention
  subclasses timm's ``Attention`` (same ``qkv``/``proj``/norm weights and state-dict keys) and
  replaces only its SDPA call by ``pe.attend`` (fused SDPA inside for every q/k-transform method).
- ``_pos_embed``: with ``dynamic_img_size=True`` timm's patch embedding returns channels-last
  ``(b, *grid, d)`` and hands it to ``_pos_embed``; ours reads the grid from that shape (so the
  positions come from the input's actual size: any resolution, rectangular, or a 3-D tubelet
  grid), calls ``pe.prepare`` once per forward, adds ``pe.embed`` to the patch tokens and
  prepends the [CLS] token with its own learned embedding. timm's own ``pos_embed`` is off
  (``pos_embed="none"``), so the PositionEncoding is the only source of positions.

The image [CLS] token has no grid position (released code: it gets its own learned embedding,
not a SeqPE one). :class:`PrefixedEncoding` runs any PositionEncoding on the patch tokens and
leaves prefix tokens position-free inside attention (q/k untransformed, zero-padded where a
method widens them, no score bias), as timm's RoPE ViTs skip prefix tokens; it uses only the
public hooks, never the method's name.

Legend: b batch, n patch tokens, t all tokens (prefix + patches), w position width (grid
dims), h heads, e head dim, d model dim, c classes.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.base import PEDraws, PEState, PositionEncoding
from seqpe_nd.encodings.prefixed import PrefixedEncoding


@dataclass
class ForwardContext:
    """What one forward shares between the ``_pos_embed`` seam and every attention layer."""

    pos_offset: Tensor | None = None
    generator: torch.Generator | None = None
    shifted: bool = False
    draws: PEDraws | None = None
    """What ``pe.draw`` gave, in place of ``generator``."""
    state: PEState | None = None
    grid: tuple[int, ...] | None = None


class PEHub:
    """Plain object (not a module) through which the seams share the current forward."""

    def __init__(self, pe: PositionEncoding) -> None:
        self.pe = pe
        self.current: ForwardContext | None = None

    @classmethod
    def bound(cls, pe: PositionEncoding, blocks: Iterable[nn.Module]) -> "PEHub":
        """A hub for ``pe`` with each block's :class:`PEAttention` bound to it, by layer index."""
        hub = cls(pe)
        for i, block in enumerate(blocks):
            block.attn.bind(hub, i)
        return hub

    def need(self) -> tuple[PositionEncoding, PEState]:
        if self.current is None or self.current.state is None:
            raise RuntimeError(
                "PEAttention runs only inside the forward of the model it is bound to (ViTWithPE, a ViT with a PE "
                "attached, the interleaved transformer)"
            )
        return self.pe, self.current.state


class PEAttention(Attention):
    """timm's ``Attention`` (its own weights and keys) with ``pe.attend`` in place of SDPA.

    Pass it as ``attn_layer=PEAttention`` to timm's VisionTransformer; :class:`ViTWithPE` binds
    each instance to its layer index.
    """

    layer: int = -1
    _hub: PEHub | None = None

    def bind(self, hub: PEHub, layer: int) -> None:
        self._hub, self.layer = hub, layer

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "PEAttention is bidirectional self-attention over all tokens: attn_mask / is_causal are not supported"
            )
        if self._hub is None:
            raise RuntimeError("PEAttention is not bound to a ViTWithPE (build the model with ViTWithPE)")
        pe, state = self._hub.need()
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, h, t, e)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = pe.attend(
            q, k, v, state, self.layer, causal=False, dropout_p=self.attn_drop.p, scale=self.scale
        )  # (b, h, t, e)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class TubeletEmbed(nn.Module):
    """Video patch embedding: a Conv3d over (T, H, W) tubelets, channels-last output ``(b, T', H', W', d)``.

    Signature-compatible with timm's ``embed_layer`` (pass ``partial(TubeletEmbed, num_frames=…,
    tubelet=…)``); only the dynamic-size path (channels-last output) is supported.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        strict_img_size: bool = True,
        output_fmt: str | None = None,
        num_frames: int = 8,
        tubelet: int = 2,
        norm_layer: Callable[..., nn.Module] | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if output_fmt != "NHWC" or dynamic_img_pad:
            raise ValueError(
                "TubeletEmbed needs the ViT's dynamic_img_size=True (channels-last output) and no dynamic_img_pad"
            )
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        p = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.patch_size = (tubelet, *p)
        self.img_size = (num_frames, *hw)
        self.grid_size = tuple(s // q for s, q in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, ...]:
        return max(self.patch_size[1:]) if as_scalar else self.patch_size

    def forward(self, x: Float[Tensor, "b c f y x"]) -> Float[Tensor, "b tt hh ww d"]:
        if x.ndim != 5:
            raise ValueError(f"TubeletEmbed expects video (b, c, frames, height, width), got shape {tuple(x.shape)}")
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))  # (b, T', H', W', d)


def vit_sizes(vit: VisionTransformer) -> dict[str, int]:
    """``num_heads``, ``head_dim``, ``num_layers`` and ``d_model`` of a timm ViT: what ``build_position_encoding`` takes."""
    attn = vit.blocks[0].attn
    return {"num_heads": attn.num_heads, "head_dim": attn.head_dim, "num_layers": len(vit.blocks),
            "d_model": vit.embed_dim}


def patch_size_of(vit: VisionTransformer) -> tuple[int, ...]:
    p = vit.patch_embed.patch_size
    return tuple(p) if isinstance(p, (tuple, list)) else (p, p)


def grid_shape(vit: VisionTransformer, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Patch grid of an input of shape ``(b, c, *spatial)`` to ``vit``; every size a whole number of patches."""
    patch = patch_size_of(vit)
    spatial = tuple(input_shape[2:])
    want = "(b, c, frames, height, width)" if len(patch) == 3 else "(b, c, height, width)"
    if len(input_shape) != 2 + len(patch):
        raise ValueError(f"input of shape {tuple(input_shape)} is not {want}")
    chans = vit.patch_embed.proj.in_channels
    if input_shape[1] != chans:
        raise ValueError(f"input has {input_shape[1]} channels, the patch embedding {chans}: shape {want}")
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"input size {list(spatial)} is not a whole number of patches {list(patch)}")
    return tuple(s // p for s, p in zip(spatial, patch))


def grid_positions(grid: Sequence[int], device: torch.device) -> Int[Tensor, "n w"]:
    """Row-major coordinates of a patch grid (timm flattens channels-last grids row-major)."""
    axes = [torch.arange(g, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def embed_positions(
    vit: VisionTransformer, pe: PositionEncoding, prefix_pos: Tensor, fwd: ForwardContext, x: Float[Tensor, "b *g d"]
) -> Float[Tensor, "b t d"]:
    """The body of timm's ``_pos_embed`` seam: positions of this input's grid, ``pe.prepare`` (its state kept in
    ``fwd`` for the attention layers), ``pe.embed`` added to the patch tokens, the prefix tokens prepended with
    their own learned embedding ``prefix_pos``."""
    B, *grid, C = x.shape
    pos = grid_positions(grid, x.device)  # (n, w)
    if fwd.pos_offset is not None:  # one offset (w,) for every image, or one per image (b, w)
        offset = fwd.pos_offset.to(pos.device)
        pos = pos + (offset[:, None] if offset.ndim == 2 else offset)
    pos = pos.expand(B, *pos.shape[-2:])  # (b, n, w)
    full = tuple(grid) if fwd.pos_offset is None else None  # the positions' extent, known from the shape
    state = pe.prepare(pos, generator=fwd.generator, shifted=fwd.shifted, draws=fwd.draws, grid=full)
    fwd.state, fwd.grid = state, tuple(grid)
    x = x.reshape(B, -1, C)  # (b, n, d)
    prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = torch.cat([torch.cat(prefix, 1) + prefix_pos, x], 1) if prefix else x  # (b, t, d)
    e = pe.embed(state)
    if e is not None:
        x = x + e.to(x.dtype)
    return vit.pos_drop(x)


class PEOutput(NamedTuple):
    """What every non-Hugging-Face backbone returns (ViTWithPE, the interleaved transformer); the causal LMs return
    a Hugging Face ``CausalLMOutputWithPE`` with the same ``logits``, ``pe_aux_loss`` and ``pe_logs``."""

    logits: Tensor
    """(b, classes); the interleaved model: (b, k), one match logit per image."""
    pe_aux_loss: Tensor | None
    """The PE's auxiliary loss (SeqPE α·L_δ + β·L_OOD) in training, else None."""
    pe_logs: dict[str, Any] | None = None
    """The PE's training logs (SeqPE: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_spread``, ``pe_cos``)."""
    classes: Tensor | None = None
    """The interleaved model: (b, k, C) per-image class logits read at the same readout (``num_classes > 0``)."""


class ViTWithPE(nn.Module):
    """A timm VisionTransformer whose positions come from a PositionEncoding.

    Build it from a timm model created with ``dynamic_img_size=True, pos_embed="none",
    attn_layer=PEAttention`` (see :func:`create_vit`) and any PositionEncoding.
    """

    def __init__(self, vit: VisionTransformer, pe: PositionEncoding) -> None:
        super().__init__()
        if not vit.dynamic_img_size:
            raise ValueError(
                "the timm model must be built with dynamic_img_size=True (positions follow the input size)"
            )
        if vit.pos_embed is not None:
            raise ValueError(
                "the timm model must be built with pos_embed='none': "
                "the PositionEncoding is the only source of positions"
            )
        attns = [blk.attn for blk in vit.blocks]
        if not all(isinstance(a, PEAttention) for a in attns):
            raise ValueError("the timm model must be built with attn_layer=PEAttention")
        pe.check_fits(num_layers=len(attns), num_heads=attns[0].num_heads, head_dim=attns[0].head_dim, model="the ViT")
        self.vit = vit
        self.pe = PrefixedEncoding(pe, vit.num_prefix_tokens)
        # The prefix ([CLS], registers) tokens' own learned position embedding (timm's pos_embed[:, :1]).
        self.prefix_pos = nn.Parameter(torch.zeros(1, vit.num_prefix_tokens, vit.embed_dim))
        trunc_normal_(self.prefix_pos, std=0.02)
        self._hub = PEHub.bound(self.pe, vit.blocks)
        vit._pos_embed = self._pos_embed  # the seam: timm's forward_features calls self._pos_embed(x)

    @classmethod
    def with_pe(cls, vit: VisionTransformer, pe_config: Any, space: Any) -> "ViTWithPE":
        """``vit`` with the PositionEncoding ``pe_config`` names on ``space``, sized from the ViT's own attention."""
        return cls(vit, build_position_encoding(pe_config, space=space, **vit_sizes(vit)))

    def grid_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input of shape ``(b, c, *spatial)``; every size a whole number of patches."""
        return grid_shape(self.vit, input_shape)

    def _pos_embed(self, x: Float[Tensor, "b *g d"]) -> Float[Tensor, "b t d"]:
        """timm's ``_pos_embed`` seam (see :func:`embed_positions`)."""
        if self._hub.current is None:
            raise RuntimeError("ViTWithPE's _pos_embed runs only inside ViTWithPE.forward")
        return embed_positions(self.vit, self.pe, self.prefix_pos, self._hub.current, x)

    def forward(
        self,
        x: Float[Tensor, "b c *s"],
        *,
        pos_offset: Int[Tensor, "*b w"] | None = None,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
        pe_draws: PEDraws | None = None,
    ) -> PEOutput:
        """Logits of images ``(b, c, H, W)`` (or videos ``(b, c, T, H, W)``) of any size.

        Args:
            pos_offset: added to every patch position (the random start shift of App. A.5): ``(w,)`` for every
                image, or ``(b, w)``, one per image.
            pe_generator, pe_shifted: passed to ``pe.prepare`` (SeqPE's regularizer samplers).
            pe_draws: ``pe.draw(generator, shifted=...)``, in place of ``pe_generator``.
        """
        self.grid_shape(x.shape)  # a wrong shape is one clear error here, not deep inside timm
        self._hub.current = ForwardContext(pos_offset=pos_offset, generator=pe_generator, shifted=pe_shifted,
                                           draws=pe_draws)
        try:
            logits = self.vit(x)
            state = self._hub.current.state
        finally:
            self._hub.current = None
        return PEOutput(logits, None if state is None else state.aux_loss, None if state is None else state.logs)

    @torch.no_grad()
    def prepare_state(self, grid: Sequence[int]) -> PEState:
        """The eval-mode PE state of a grid (for analysis: e.g. SeqPE embeddings of every position)."""
        return self.pe.prepare(grid_positions(grid, self.prefix_pos.device)[None])


def create_vit(
    name: str | None = None,
    *,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    embed_layer: Callable[..., nn.Module] | None = None,
) -> VisionTransformer:
    """A timm VisionTransformer prepared for :class:`ViTWithPE` (dynamic size, no pos_embed, PEAttention).

    ``name`` (e.g. ``vit_small_patch16_224``) goes through ``timm.create_model``: its own architecture, with
    any of ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_ratio`` that is given overriding
    it (timm's model arguments). Without ``name`` a VisionTransformer is built directly, the unset ones
    taking ViT-S/16's values (16, 384, 12, 6, 4.0).
    """
    shape = {k: v for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                   mlp_ratio=mlp_ratio).items() if v is not None}
    common: dict[str, Any] = dict(
        img_size=img_size,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        in_chans=in_chans,
        dynamic_img_size=True,
        pos_embed="none",
        class_token=True,
        attn_layer=PEAttention,
        **shape,
    )
    if embed_layer is not None:
        common["embed_layer"] = embed_layer
    if name is not None:
        import timm

        return timm.create_model(name, pretrained=False, **common)
    return VisionTransformer(**{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0), **common})

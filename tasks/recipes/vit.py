"""timm's VisionTransformer with any position encoding, and the ViT recipe of §4.3 (Tables 3, 5).

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

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, SeqPEConfig, build_position_encoding, pe_metrics
from seqpe_nd.encodings.base import PEState, PositionEncoding, ScoreMod
from seqpe_nd.positions import GridSpace, load_space
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON as EVAL_JSON, classify, reject_unknown_options, write_result
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.trainer import TrainConfig, unwrap
from seqpe_nd.tasks.data.vision import ImageSource, Prefetcher, TrainBatches, VisionDataConfig, eval_images

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_PNG = "eval.png"
SIMILARITY_PNG = "pe_similarity.png"
STRICT_SECTIONS: tuple[str, ...] = ("task", "model", "space", "pe")


# =====================================================================================================
# Prefix tokens ([CLS]) around any PositionEncoding
# =====================================================================================================


@dataclass(eq=False)
class PrefixState(PEState):
    """State over all tokens (prefix positions are placeholders); ``inner`` is the patch tokens' state."""

    inner: PEState | None = None
    num_prefix: int = 0


class PrefixedEncoding(PositionEncoding):
    """``inner`` on the patch tokens; the first ``num_prefix`` tokens have no position.

    Built only from ``inner``'s public hooks: ``transform_qk`` sees the patch tokens, prefix q/k
    pass unchanged (zero-padded if the method widens q/k, so they add no PE score), and a
    ``score_mod`` bias applies only between patch tokens.
    """

    def __init__(self, inner: PositionEncoding, num_prefix: int) -> None:
        super().__init__(
            num_heads=inner.num_heads, head_dim=inner.head_dim, num_layers=inner.num_layers, width=inner.width
        )
        self.inner, self.num_prefix = inner, num_prefix
        self.method = inner.method
        self.score_backend = inner.score_backend
        self.bias_per_layer = inner.bias_per_layer

    def prepare(
        self,
        pos_q: Int[Tensor, "b n w"],
        pos_k: Int[Tensor, "b m w"] | None = None,
        *,
        generator: torch.Generator | None = None,
        shifted: bool = False,
    ) -> PrefixState:
        """``inner.prepare`` on the patch positions; placeholders (never read) for the prefix."""
        inner = self.inner.prepare(pos_q, pos_k, generator=generator, shifted=shifted)
        pad = inner.pos_q.new_zeros(inner.pos_q.shape[0], self.num_prefix, inner.pos_q.shape[-1])
        pk = inner.pos_q if inner.pos_k is inner.pos_q else inner.pos_k
        return PrefixState(
            pos_q=torch.cat([pad, inner.pos_q], 1),
            pos_k=torch.cat([pad, pk], 1),
            aux_loss=inner.aux_loss,
            logs=inner.logs,
            shared_rows=inner.shared_rows,
            inner=inner,
            num_prefix=self.num_prefix,
        )

    def embed(self, state: PEState) -> Float[Tensor, "b t d"] | None:
        """``inner.embed`` of the patch tokens, zero for the prefix (which has its own learned embedding)."""
        e = self.inner.embed(_inner(state))
        return None if e is None else F.pad(e, (0, 0, self.num_prefix, 0))

    def transform_qk(
        self, q: Float[Tensor, "b h t e"], k: Float[Tensor, "b h tk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h t eq"], Float[Tensor, "b h tk eq"]]:
        """``inner.transform_qk`` on the patch tokens; prefix q/k unchanged."""
        p = self.num_prefix
        if k.shape[-2] != state.pos_k.shape[1]:
            raise ValueError("PrefixedEncoding has no key-value cache: pass all keys")
        q2, k2 = self.inner.transform_qk(q[:, :, p:], k[:, :, p:], _inner(state), layer)
        widen = q2.shape[-1] - q.shape[-1]  # SeqPE attn_bias concatenates e^q, e^k
        qp, kp = (F.pad(x[:, :, :p], (0, widen)) for x in (q, k))
        return torch.cat([qp, q2], 2), torch.cat([kp, k2], 2)

    def score_mod(self, state: PEState, layer: int) -> ScoreMod | None:
        """``inner``'s bias between patch tokens; none on rows or columns of prefix tokens."""
        mod = self.inner.score_mod(_inner(state), layer)
        if mod is None:
            return None
        p = self.num_prefix

        def shifted(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            inner = mod(score, b, h, (qi - p).clamp_min(0), (ki - p).clamp_min(0))
            return torch.where((qi >= p) & (ki >= p), inner, score)

        return shifted


def _inner(state: PEState) -> PEState:
    if not isinstance(state, PrefixState) or state.inner is None:
        raise TypeError("PrefixedEncoding hooks need the PrefixState its prepare() returned")
    return state.inner


# =====================================================================================================
# The timm seams
# =====================================================================================================


@dataclass
class _Forward:
    """What one forward shares between the ``_pos_embed`` seam and every attention layer."""

    pos_offset: Tensor | None = None
    generator: torch.Generator | None = None
    shifted: bool = False
    state: PEState | None = None
    grid: tuple[int, ...] | None = None


class _Hub:
    """Plain object (not a module) through which the seams share the current forward."""

    def __init__(self) -> None:
        self.pe: PositionEncoding | None = None
        self.current: _Forward | None = None

    def need(self) -> tuple[PositionEncoding, PEState]:
        if self.current is None or self.current.state is None or self.pe is None:
            raise RuntimeError(
                "PEAttention runs only inside ViTWithPE.forward (call the wrapper, not the bare timm model)"
            )
        return self.pe, self.current.state


class PEAttention(Attention):
    """timm's ``Attention`` (its own weights and keys) with ``pe.attend`` in place of SDPA.

    Pass it as ``attn_layer=PEAttention`` to timm's VisionTransformer; :class:`ViTWithPE` binds
    each instance to its layer index.
    """

    layer: int = -1
    _hub: _Hub | None = None

    def bind(self, hub: _Hub, layer: int) -> None:
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


class ViTOutput(NamedTuple):
    logits: Tensor
    aux_loss: Tensor | None
    """The PE's auxiliary loss (SeqPE α·L_δ + β·L_OOD) in training, else None."""
    logs: dict[str, Any] | None = None
    """The PE's training logs (SeqPE: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_cos``)."""


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
        if pe.num_layers != len(attns) or pe.num_heads != attns[0].num_heads or pe.head_dim != attns[0].head_dim:
            raise ValueError(
                f"PE sized for {pe.num_layers} layers × {pe.num_heads} heads × {pe.head_dim} dims, "
                f"the ViT has {len(attns)} × {attns[0].num_heads} × {attns[0].head_dim}"
            )
        self.vit = vit
        self.pe = PrefixedEncoding(pe, vit.num_prefix_tokens)
        # The prefix ([CLS], registers) tokens' own learned position embedding (timm's pos_embed[:, :1]).
        self.prefix_pos = nn.Parameter(torch.zeros(1, vit.num_prefix_tokens, vit.embed_dim))
        trunc_normal_(self.prefix_pos, std=0.02)
        self._hub = _Hub()
        self._hub.pe = self.pe
        for i, attn in enumerate(attns):
            attn.bind(self._hub, i)
        vit._pos_embed = self._pos_embed  # the seam: timm's forward_features calls self._pos_embed(x)

    @property
    def patch_size(self) -> tuple[int, ...]:
        p = self.vit.patch_embed.patch_size
        return tuple(p) if isinstance(p, (tuple, list)) else (p, p)

    def grid_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input of shape ``(b, c, *spatial)`` (floor division, as the conv)."""
        spatial = tuple(input_shape[2:])
        if len(spatial) != len(self.patch_size):
            raise ValueError(
                f"input has {len(spatial)} spatial dims {spatial}, the patch embedding {len(self.patch_size)}"
            )
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def grid_positions(self, grid: Sequence[int], device: torch.device) -> Int[Tensor, "n w"]:
        """Row-major coordinates of a patch grid (timm flattens channels-last grids row-major)."""
        axes = [torch.arange(g, device=device) for g in grid]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))

    def _pos_embed(self, x: Float[Tensor, "b *g d"]) -> Float[Tensor, "b t d"]:
        """timm's ``_pos_embed`` seam: positions of this input's grid, ``pe.prepare``, ``pe.embed``, prefix tokens."""
        fwd = self._hub.current
        if fwd is None:
            raise RuntimeError("ViTWithPE's _pos_embed runs only inside ViTWithPE.forward")
        B, *grid, C = x.shape
        pos = self.grid_positions(grid, x.device)  # (n, w)
        if fwd.pos_offset is not None:
            pos = pos + fwd.pos_offset.to(pos.device)
        pos = pos.expand(B, *pos.shape)  # (b, n, w)
        state = self.pe.prepare(pos, generator=fwd.generator, shifted=fwd.shifted)
        fwd.state, fwd.grid = state, tuple(grid)
        x = x.reshape(B, -1, C)  # (b, n, d)
        prefix = [t.expand(B, -1, -1) for t in (self.vit.cls_token, self.vit.reg_token) if t is not None]
        x = torch.cat([torch.cat(prefix, 1) + self.prefix_pos, x], 1) if prefix else x  # (b, t, d)
        e = self.pe.embed(state)
        if e is not None:
            x = x + e.to(x.dtype)
        return self.vit.pos_drop(x)

    def forward(
        self,
        x: Float[Tensor, "b c *s"],
        *,
        pos_offset: Int[Tensor, " w"] | None = None,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
    ) -> ViTOutput:
        """Logits of images ``(b, c, H, W)`` (or videos ``(b, c, T, H, W)``) of any size.

        Args:
            pos_offset: added to every patch position (the random start shift of App. A.5).
            pe_generator, pe_shifted: passed to ``pe.prepare`` (SeqPE's regularizer samplers).
        """
        self._hub.current = _Forward(pos_offset=pos_offset, generator=pe_generator, shifted=pe_shifted)
        try:
            logits = self.vit(x)
            state = self._hub.current.state
        finally:
            self._hub.current = None
        return ViTOutput(logits, None if state is None else state.aux_loss, None if state is None else state.logs)

    @torch.no_grad()
    def prepare_state(self, grid: Sequence[int]) -> PEState:
        """The eval-mode PE state of a grid (for analysis: e.g. SeqPE embeddings of every position)."""
        pos = self.grid_positions(grid, self.prefix_pos.device)[None]
        return self.pe.prepare(pos)


def create_vit(
    name: str | None = None,
    *,
    img_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    embed_layer: Callable[..., nn.Module] | None = None,
) -> VisionTransformer:
    """A timm VisionTransformer prepared for :class:`ViTWithPE` (dynamic size, no pos_embed, PEAttention).

    ``name`` (e.g. ``vit_small_patch16_224``) goes through ``timm.create_model`` with its own
    architecture; without it a VisionTransformer of the given shape is built directly.
    """
    common: dict[str, Any] = dict(
        img_size=img_size,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        in_chans=in_chans,
        dynamic_img_size=True,
        pos_embed="none",
        class_token=True,
        attn_layer=PEAttention,
    )
    if embed_layer is not None:
        common["embed_layer"] = embed_layer
    if name is not None:
        import timm

        return timm.create_model(name, pretrained=False, **common)
    return VisionTransformer(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, **common
    )


# =====================================================================================================
# The recipe: configs
# =====================================================================================================


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ViTSettings(_Section):
    """The ViT backbone (``model:``)."""

    name: str | None = None
    """timm model name (``vit_small_patch16_224`` = ViT-S/16); None builds the shape below."""
    img_size: PositiveInt = 224
    """Training resolution R in pixels (square); the space's L must equal R / patch_size."""
    patch_size: PositiveInt = 16
    """Patch size (must match the timm model's when ``name`` is set)."""
    embed_dim: PositiveInt = 384
    """Width (ignored when ``name`` is set)."""
    depth: PositiveInt = 12
    """Blocks (ignored when ``name`` is set)."""
    num_heads: PositiveInt = 6
    """Heads (ignored when ``name`` is set)."""
    mlp_ratio: float = Field(4.0, gt=0)
    """MLP width ratio (ignored when ``name`` is set)."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth (DeiT ViT-S: 0.1)."""

    @model_validator(mode="after")
    def _check(self) -> "ViTSettings":
        if self.name is None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim = {self.embed_dim} must be divisible by num_heads = {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size = {self.img_size} must be a multiple of patch_size = {self.patch_size}")
        return self


class ViTEvalSettings(_Section):
    """Evaluation (``eval:``) and validation during training."""

    resolutions: list[PositiveInt] | None = None
    """Resolutions S for ``seqpe-nd eval``; default Table 3's 224, 320, 384, 448, 512, 640, 672 scaled to R."""
    max_images: PositiveInt | None = None
    """Evaluate only the first this many validation images (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Images per evaluation forward."""
    val_images: PositiveInt = 512
    """Validation during training: the first this many images at the training resolution."""


class ViTConfig(_Section):
    """A whole ViT run: one YAML file with ``task: vit``."""

    task: Literal["vit"] = "vit"
    model: ViTSettings = ViTSettings()
    data: VisionDataConfig = VisionDataConfig()
    space: dict[str, Any] | str = "configs/positions/image-14x14.yaml"
    """2-D position space: a YAML path (working directory or repository) or an inline mapping."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(integration="attn_mul", per_layer=True, hidden=384, init="trunc_normal")
    )
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope_axial, rope_mixed, seqpe, ...)."""
    random_shift: bool = False
    """Shift a whole step's patch positions with the space's ``shift.prob`` (App. A.5; SeqPE runs)."""
    train: TrainConfig = TrainConfig()
    eval: ViTEvalSettings = ViTEvalSettings()


def resolve_space(source: dict[str, Any] | str) -> GridSpace:
    if isinstance(source, dict):
        space = load_space(source)
    else:
        p = Path(source)
        found = next((c for c in (p, Path.cwd() / p, REPO_ROOT / p) if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"space file {source!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")
        space = load_space(found)
    if not isinstance(space, GridSpace) or space.ndim != 2:
        raise ValueError(
            f"space: the ViT recipe needs a 2-D grid space, got {getattr(space, 'kind', '?')} of width {space.width}"
        )
    return space


def parse_config(config: dict[str, Any] | ViTConfig) -> ViTConfig:
    """Validate a run config; errors name the dotted field path."""
    if isinstance(config, ViTConfig):
        return config
    try:
        return ViTConfig.model_validate(config)
    except ValidationError as err:
        from seqpe_nd.tasks.recipes import format_validation_error

        raise ValueError(format_validation_error(err)) from None


def build_model(cfg: ViTConfig, space: GridSpace) -> ViTWithPE:
    """A randomly initialised ViT whose positions come from ``cfg.pe``."""
    m = cfg.model
    vit = create_vit(
        m.name,
        img_size=m.img_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_classes=cfg.data.classes,
        drop_path_rate=m.drop_path_rate,
    )
    if tuple(vit.patch_embed.patch_size) != (m.patch_size, m.patch_size):
        raise ValueError(
            f"model.patch_size = {m.patch_size} but timm model {m.name!r} has patch size {vit.patch_embed.patch_size}"
        )
    attn = vit.blocks[0].attn
    pe = build_position_encoding(
        cfg.pe,
        space=space,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        num_layers=len(vit.blocks),
        d_model=vit.embed_dim,
    )
    return ViTWithPE(vit, pe)


def criterion(cfg: ViTConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """timm's losses: soft-target CE after Mixup/CutMix (smoothing inside), label smoothing, or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    aug = cfg.data.augment
    if aug.mixing:
        return SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def accuracy(
    model: nn.Module, source: ImageSource, size: int, indices: Sequence[int], *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 accuracy and loss of ``indices`` at resolution ``size`` (the paper's resize + centre crop)."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(0, len(indices), batch_size):
            x, y = eval_images(source, size, indices[s : s + batch_size])
            yield x.to(device), y.to(device)

    return classify(lambda x: model(x).logits, batches(), unit="images")


class ViTTask:
    """TrainTask of the ViT recipe (see :class:`seqpe_nd.tasks.engine.trainer.TrainTask`)."""

    def __init__(self, cfg: ViTConfig, run_dir: Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.train_cfg = cfg.train
        self.space = resolve_space(cfg.space)
        grid = cfg.model.img_size // cfg.model.patch_size
        if tuple(self.space.L) != (grid, grid):
            raise ValueError(
                f"space.L = {list(self.space.L)} must be the training patch grid [{grid}, {grid}] "
                f"(model.img_size = {cfg.model.img_size} / model.patch_size = {cfg.model.patch_size})"
            )
        self.loss_fn = criterion(cfg)
        self._batches: Prefetcher | None = None
        self._val: ImageSource | None = None

    # -- TrainTask ------------------------------------------------------------------------
    def build_model(self) -> ViTWithPE:
        return build_model(self.cfg, self.space)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t = self.train_cfg
        if self._batches is None:
            data = TrainBatches(self.cfg.data, self.cfg.model.img_size, t.seed)
            self._batches = Prefetcher(data, self.cfg.data.workers, stride=t.batch_size * world)
        first = ((step * t.grad_accum + micro) * world + rank) * t.batch_size
        return self._batches(first, t.batch_size)

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        images, targets = batch["images"], batch["targets"]
        offset, shifted = None, False
        if self.cfg.random_shift:
            grid = unwrap(model).grid_shape(images.shape)
            shift = self.space.sample_shift(generator, extent=list(grid))
            if shift.applied:  # the whole step's grids start at z (App. A.5)
                offset, shifted = shift.z.to(images.device), True
        out = model(images, pos_offset=offset, pe_generator=generator, pe_shifted=shifted)
        main = self.loss_fn(out.logits.float(), targets)
        metrics: dict[str, float | Tensor] = {"cls_loss": float(main.detach()), "shifted": float(shifted)}
        if targets.ndim == 1:
            metrics["train_top1"] = 100.0 * float((out.logits.argmax(-1) == targets).float().mean())
        total = main
        if out.aux_loss is not None:
            total = total + out.aux_loss
        metrics.update(pe_metrics(out.aux_loss, out.logs))
        return total, metrics

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 on the first ``eval.val_images`` validation images at the training resolution."""
        device = next(unwrap(model).parameters()).device
        source = self.val_source()
        n = min(len(source), self.cfg.eval.val_images)
        res = accuracy(
            model, source, self.cfg.model.img_size, range(n), batch_size=self.cfg.eval.batch_size, device=device
        )
        return {"top1": res["top1"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["images"].shape[0])  # images, for images/s

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        # Biases, norms, cls/prefix embeddings and every PE parameter (timm exempts pos_embed and
        # cls_token; the released code trains the SeqPE encoder without decay).
        return param.ndim < 2 or name.startswith("pe.") or name in ("prefix_pos", "vit.cls_token", "vit.reg_token")

    def config_dict(self) -> dict[str, Any]:
        out = self.cfg.model_dump(mode="json", exclude={"train"})
        out["space"] = self.space.model_dump(mode="json")
        return out

    # -- helpers ----------------------------------------------------------------------------
    def val_source(self) -> ImageSource:
        if self._val is None:
            self._val = ImageSource(self.cfg.data, "validation", self.train_cfg.seed)
        return self._val


def build_task(config: dict[str, Any], run_dir: Path) -> ViTTask:
    """The recipe entry point (``task: vit``)."""
    return ViTTask(parse_config(config), run_dir)


# =====================================================================================================
# Evaluation (§4.3): accuracy vs resolution, Fig. 3 similarity maps
# =====================================================================================================


def load_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a training run directory?")
    return json.loads(path.read_text())


def load_model(run_dir: Path, *, task: ViTTask | None = None) -> ViTWithPE:
    """The trained model of a run, in eval mode; a checkpoint whose model/space/PE differs says which field."""
    run_dir = Path(run_dir)
    found = ckpt.latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}")
    if task is None:
        task = ViTTask(parse_config(load_run_config(run_dir)), run_dir)
    saved = json.loads((found / "config.json").read_text())
    ckpt.check_config(task.config_dict(), {k: v for k, v in saved.items() if k != "train"}, STRICT_SECTIONS)
    model = task.build_model()
    ckpt.load_weights(model, found)
    return model.eval()


PAPER_RATIOS: tuple[float, ...] = (224 / 224, 320 / 224, 384 / 224, 448 / 224, 512 / 224, 640 / 224, 672 / 224)
"""Table 3's columns as multiples of the training resolution (224 … 672 px)."""


def default_resolutions(img_size: int, patch_size: int) -> list[int]:
    """Table 3's resolutions scaled to R, rounded to whole patches (224, 320, …, 672 for ViT-S/16 at 224)."""
    out = [max(patch_size, round(img_size * f / patch_size) * patch_size) for f in PAPER_RATIOS]
    return sorted(set(out))


def evaluate(
    run_dir: Path,
    *,
    resolutions: Sequence[int] | None = None,
    max_images: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    write: bool = True,
    quiet: bool = False,
    **_unused: Any,
) -> dict[str, Any]:
    """§4.3 top-1 of a trained run at each resolution S (resize 256/224·S, centre-crop S, same patch size).

    Writes ``eval.json`` (atomically), ``eval.png`` (accuracy vs resolution) and, when the PE
    has a per-position embedding (SeqPE), ``pe_similarity.png`` (Fig. 3).
    """
    reject_unknown_options("vit", _unused, ("resolutions", "max_images", "batch_size", "device"))
    run_dir = Path(run_dir)
    cfg = parse_config(load_run_config(run_dir))
    task = ViTTask(cfg, run_dir)
    R, P = cfg.model.img_size, cfg.model.patch_size
    sizes = list(resolutions or cfg.eval.resolutions or default_resolutions(R, P))
    bad = [s for s in sizes if s < P]
    if bad:
        raise ValueError(f"resolutions {bad} are smaller than one patch ({P} px)")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    model = load_model(run_dir, task=task).to(dev)
    source = task.val_source()
    n = (
        len(source)
        if max_images is None and cfg.eval.max_images is None
        else min(len(source), max_images or cfg.eval.max_images or 0)
    )
    bs = batch_size or cfg.eval.batch_size
    t0 = time.perf_counter()
    rows = {str(s): {**accuracy(model, source, s, range(n), batch_size=bs, device=dev), "grid": s // P} for s in sizes}
    result = {
        "run_dir": str(run_dir),
        "train_resolution": R,
        "patch_size": P,
        "pe": cfg.pe.model_dump(mode="json"),
        "data": cfg.data.source,
        "device": str(dev),
        "seconds": time.perf_counter() - t0,
        "resolutions": rows,
    }
    if write:
        grid = (max(sizes) // P,) * 2
        sim = position_similarity(model, grid)
        if sim is not None:
            plot_similarity(
                sim,
                grid,
                run_dir / SIMILARITY_PNG,
                title=f"{run_dir.name}: PE dot products on the {grid[0]}×{grid[1]} grid of {max(sizes)} px",
            )
            result["similarity_png"] = SIMILARITY_PNG
        plot_accuracy({run_dir.name: result}, run_dir / EVAL_PNG)
        write_result(run_dir, result)
    if not quiet:
        print_eval(result)
    return result


def print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    R = result["train_resolution"]
    table = Table(title=f"{result['run_dir']} — top-1 vs resolution (trained at {R} px, {result['data']} data)")
    for col in ("resolution", "× train", "grid", "images", "top-1 %", "loss", "img/s", "seconds"):
        table.add_column(col, justify="right")
    for s, r in result["resolutions"].items():
        table.add_row(
            s,
            f"{int(s) / R:g}",
            f"{r['grid']}×{r['grid']}",
            str(r["images"]),
            f"{r['top1']:.2f}",
            f"{r['loss']:.3f}",
            f"{r['images_per_s']:.0f}",
            f"{r['seconds']:.1f}",
        )
    Console().print(table)


def compare(run_dirs: Sequence[Path], out_png: Path, *, title: str | None = None) -> dict[str, Any]:
    """One accuracy-vs-resolution plot of several evaluated runs (each run's ``eval.json``)."""
    results = {}
    for d in run_dirs:
        path = Path(d) / EVAL_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `seqpe-nd eval {d}` first")
        results[Path(d).name] = json.loads(path.read_text())
    plot_accuracy(results, Path(out_png), title=title)
    return results


def write_comparison(results: dict[str, dict[str, Any]], out: Path | None, *, title: str) -> str:
    """Print one top-1 table of several evaluated runs; with ``out``, write compare.json/.md/.png there."""
    from rich.console import Console
    from rich.table import Table

    sizes = sorted({int(s) for r in results.values() for s in r["resolutions"]})
    table = Table(title=title)
    md = ["| run | " + " | ".join(str(s) for s in sizes) + " | avg |", "|" + "---|" * (len(sizes) + 2)]
    for col in ["run", *map(str, sizes), "avg"]:
        table.add_column(col, justify="right")
    for name, r in results.items():
        accs = [r["resolutions"].get(str(s), {}).get("top1") for s in sizes]
        shown = [f"{a:.2f}" if a is not None else "–" for a in accs]
        got = [a for a in accs if a is not None]
        avg = f"{sum(got) / len(got):.2f}" if got else "–"
        table.add_row(name, *shown, avg)
        md.append(f"| {name} | " + " | ".join(shown) + f" | {avg} |")
    Console().print(table)
    text = "\n".join(md) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "compare.json", json.dumps({"title": title, "runs": results}, indent=1) + "\n")
        ckpt.atomic_write_text(out / "compare.md", f"## {title}\n\n{text}")
        plot_accuracy(results, out / "compare.png", title=title)
    return text


@torch.no_grad()
def position_similarity(model: ViTWithPE, grid: Sequence[int]) -> Float[Tensor, "5 n"] | None:
    """Fig. 3: dot products of the four corners' and the centre's position embedding with every
    position of ``grid``. The embedding is ``pe.embed`` where the method has one (APE), else the
    SeqPE encoder's output; None for methods without per-position vectors (RoPE, NoPE)."""
    state = model.prepare_state(grid)
    emb = model.pe.embed(state)
    if emb is not None:
        emb = emb[0, model.pe.num_prefix :]
    else:
        encoder = getattr(model.pe.inner, "encoder", None)  # SeqPE's attention integrations
        if encoder is None:
            return None
        emb = encoder(state.pos_q[:, model.pe.num_prefix :])[0]
    emb = emb.float()  # (n, d)
    H, W = grid
    probes = [0, W - 1, (H - 1) * W, H * W - 1, (H // 2) * W + W // 2]  # corners, centre (row-major)
    return emb[probes] @ emb.T


def plot_similarity(sim: Tensor, grid: Sequence[int], path: Path, *, title: str) -> Path:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.3), dpi=110)
    for ax, row, name in zip(axes, sim, names):
        im = ax.imshow(row.reshape(*grid).cpu().numpy(), cmap="viridis")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_accuracy(results: dict[str, dict[str, Any]], path: Path, *, title: str | None = None) -> Path:
    """Top-1 against evaluation resolution, one line per run, training resolution marked."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    trains = set()
    for name, res in results.items():
        xs = sorted(int(s) for s in res["resolutions"])
        ax.plot(xs, [res["resolutions"][str(x)]["top1"] for x in xs], marker="o", label=name)
        trains.add(res["train_resolution"])
    for r in trains:
        ax.axvline(r, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation resolution (px, same patch size)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "top-1 vs resolution", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path

"""A position encoding in a timm VisionTransformer the user already has: attach, save, load.

:func:`attach_vit` changes a ``timm.create_model("vit_…")`` instance in place, keeping every weight:

- each block's timm ``Attention`` becomes :class:`~seqpe_nd.tasks.backbones.vit.PEAttention` (same
  weights and state-dict keys, ``pe.attend`` in place of SDPA);
- the patch embedding switches to timm's dynamic-size path (channels-last grid), so positions follow
  each input's own size: a model made for 224 px runs at 448 px, or 64 × 96;
- the learned ``pos_embed`` gives way to the PE; its prefix rows ([CLS], registers) become the prefix
  tokens' own embedding ``prefix_pos`` (timm's RoPE ViTs likewise leave prefix tokens position-free);
- the model takes the class :class:`VisionTransformerWithPE`, a ``VisionTransformer`` whose forward
  returns timm's tensor and leaves the PE's auxiliary loss (SeqPE: α·L_δ + β·L_OOD in training, else
  0) in ``model.pe_aux_loss``, to add to the task loss: ``loss = F.cross_entropy(model(x), y) +
  model.pe_aux_loss``.

:func:`save_vit` writes ``model.safetensors`` and ``config.json`` (the VisionTransformer's arguments,
read off the instance and checked by rebuilding it, and the PE's config and space); :func:`load_vit`
builds the same model back with equal outputs.

Legend: b batch, c channels, t tokens.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from timm.layers import Attention, Format, LayerScale, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import seqpe_nd
from seqpe_nd.encodings import PESpec, build_position_encoding
from seqpe_nd.encodings.base import PEDraws, PositionEncoding
from seqpe_nd.encodings.prefixed import PrefixedEncoding
from seqpe_nd.tasks.backbones.vit import (
    ForwardContext, PEAttention, PEHub, ViTWithPE, embed_positions, grid_shape, vit_sizes,
)
from seqpe_nd.tasks.engine.checkpoint import atomic_write_text

FORMAT = "seqpe_nd.timm_vit"
"""``config.json``'s ``format``: a timm VisionTransformer with a position encoding, written by :func:`save_vit`."""
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class VisionTransformerWithPE(VisionTransformer):
    """The class a timm ``VisionTransformer`` takes once :func:`attach_vit` gave it a position encoding.

    Its forward (and ``forward_features``, ``forward_intermediates``) is timm's, with optional keyword
    arguments for the PE: ``pos_offset`` (added to every patch position, ``(w,)`` or ``(b, w)``),
    ``pe_generator`` and ``pe_shifted`` (SeqPE's regularizer samplers; ``pe_draws``, what ``pe.draw`` gave, in
    place of the generator). After each call ``pe_aux_loss``
    holds the PE's auxiliary loss (a 0-d tensor; 0 in eval mode or for a PE without one) and ``pe_logs``
    its parts (SeqPE: ``loss_delta``, ``loss_ood``, ...).
    """

    pe: PrefixedEncoding
    prefix_pos: nn.Parameter
    pe_aux_loss: Tensor
    pe_logs: dict[str, Any]
    _pe_hub: PEHub

    @contextmanager
    def _pe_forward(
        self, pos_offset: Int[Tensor, "*b w"] | None, pe_generator: torch.Generator | None, pe_shifted: bool,
        pe_draws: PEDraws | None = None,
    ) -> Iterator[None]:
        if self._pe_hub.current is not None:  # forward -> forward_features: the outer call owns the context
            yield
            return
        self._pe_hub.current = ForwardContext(pos_offset=pos_offset, generator=pe_generator, shifted=pe_shifted,
                                              draws=pe_draws)
        try:
            yield
            state = self._pe_hub.current.state
            aux = None if state is None else state.aux_loss
            self.pe_aux_loss = aux if aux is not None else self.prefix_pos.new_zeros(())
            self.pe_logs = dict(state.logs or {}) if state is not None else {}
        finally:
            self._pe_hub.current = None

    def _pos_embed(self, x: Float[Tensor, "b *g d"]) -> Float[Tensor, "b t d"]:
        if self._pe_hub.current is None:
            raise RuntimeError("_pos_embed runs inside the model's forward, forward_features or forward_intermediates")
        return embed_positions(self, self.pe, self.prefix_pos, self._pe_hub.current, x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *,
                pos_offset: Tensor | None = None, pe_generator: torch.Generator | None = None,
                pe_shifted: bool = False, pe_draws: PEDraws | None = None) -> Tensor:
        grid_shape(self, x.shape)  # a wrong shape is one clear error here, not deep inside timm
        with self._pe_forward(pos_offset, pe_generator, pe_shifted, pe_draws):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *,
                         pos_offset: Tensor | None = None, pe_generator: torch.Generator | None = None,
                         pe_shifted: bool = False, pe_draws: PEDraws | None = None) -> Tensor:
        with self._pe_forward(pos_offset, pe_generator, pe_shifted, pe_draws):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with self._pe_forward(None, None, False):
            return super().forward_intermediates(x, *args, **kwargs)


def attach_vit(model: VisionTransformer, pe: PositionEncoding) -> VisionTransformerWithPE:
    """Put ``pe`` into a timm ``VisionTransformer`` in place, keeping its weights; returns the model (see the module doc).

    Every check runs before the model changes: a timm ``Attention`` in every block, ``pe`` sized for the
    model (:func:`vit_sizes`), a 2-D position space when ``pe`` records one.
    """
    if isinstance(model, VisionTransformerWithPE):
        raise ValueError("this VisionTransformer already has a position encoding attached")
    if type(model) is not VisionTransformer:
        raise ValueError(f"attach_position_encoding takes timm's VisionTransformer (timm.create_model('vit_...')); "
                         f"got {type(model).__name__}")
    kinds = sorted({type(b.attn).__name__ for b in model.blocks if type(b.attn) not in (Attention, PEAttention)})
    if kinds:
        raise ValueError(f"every block's attention must be timm's Attention to take a position encoding; found {kinds}")
    sizes = vit_sizes(model)
    pe.check_fits(num_layers=sizes["num_layers"], num_heads=sizes["num_heads"], head_dim=sizes["head_dim"],
                  model="the ViT")
    if pe.spec is not None and pe.spec.space.width != 2:
        raise ValueError(f"an image ViT's patches have 2-D positions (row, column); the PE's space has positions of "
                         f"width {pe.spec.space.width}: build it on a 2-D grid space, e.g. configs/positions/image-14x14.yaml")
    prefix = model.num_prefix_tokens
    prefix_pos = torch.zeros(1, prefix, model.embed_dim, device=model.patch_embed.proj.weight.device)
    if model.pos_embed is not None and not model.no_embed_class and prefix:
        prefix_pos = model.pos_embed.detach()[:, :prefix].clone()  # pretrained [CLS] position kept
    elif prefix:
        trunc_normal_(prefix_pos, std=0.02)
    # -- the changes --
    for block in model.blocks:
        block.attn.__class__ = PEAttention
    model.pos_embed = None
    model.dynamic_img_size = True
    patch = model.patch_embed
    patch.flatten, patch.output_fmt, patch.strict_img_size = False, Format.NHWC, False
    return _install(model, PrefixedEncoding(pe, prefix).train(model.training), nn.Parameter(prefix_pos))


def from_wrapper(wrapper: ViTWithPE) -> VisionTransformerWithPE:
    """A recipe's :class:`ViTWithPE` as the attached VisionTransformer it is equivalent to (same tensors)."""
    vit = wrapper.vit
    del vit._pos_embed  # the wrapper's instance-level seam; the class's method takes over
    return _install(vit, wrapper.pe, wrapper.prefix_pos)


def _install(vit: VisionTransformer, pe: PrefixedEncoding, prefix_pos: nn.Parameter) -> VisionTransformerWithPE:
    """``vit`` (PEAttention in every block, timm's dynamic-size path, no pos_embed) as a VisionTransformerWithPE."""
    vit.__class__ = VisionTransformerWithPE
    vit.prefix_pos, vit.pe = prefix_pos, pe
    vit._pe_hub = PEHub.bound(pe, vit.blocks)
    vit.pe_aux_loss, vit.pe_logs = prefix_pos.new_zeros(()), {}
    return vit  # type: ignore[return-value]


# --- save and load -----------------------------------------------------------------------------------------

def vit_arguments(model: VisionTransformer) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments that rebuild ``model``'s architecture, read off the instance."""
    block, attn = model.blocks[0], model.blocks[0].attn
    norm = block.norm1
    return {
        "img_size": list(model.patch_embed.img_size), "patch_size": list(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels, "num_classes": model.num_classes,
        "global_pool": model.global_pool, "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": attn.qkv.bias is not None, "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "init_values": 1.0 if isinstance(block.ls1, LayerScale) else None,
        "class_token": model.cls_token is not None, "reg_tokens": model.num_reg_tokens,
        "no_embed_class": model.no_embed_class, "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "final_norm": not isinstance(model.norm, nn.Identity), "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "norm_eps": getattr(norm, "eps", 1e-6),
    }


def _build(arguments: dict[str, Any], device: str | torch.device | None = None) -> VisionTransformer:
    args = dict(arguments)
    eps = args.pop("norm_eps")
    with torch.device(device) if device is not None else nullcontext():
        return VisionTransformer(**args, norm_layer=partial(nn.LayerNorm, eps=eps), pos_embed="none",
                                 dynamic_img_size=True, attn_layer=PEAttention)


def _structure(model: nn.Module) -> list[tuple[str, str, str]]:
    return [(n, type(m).__name__, m.extra_repr()) for n, m in model.named_modules()
            if n and not (n == "pe" or n.startswith("pe."))]


def save_vit(model: VisionTransformerWithPE, directory: str | Path) -> Path:
    """Write ``model`` (from :func:`attach_vit` or :func:`load_vit`) to ``directory``: ``model.safetensors`` and
    ``config.json``. Refused, before anything is written, for a PE built by hand (its config is unknown) or an
    architecture the recorded arguments would not rebuild."""
    if not isinstance(model, VisionTransformerWithPE):
        raise ValueError(f"save_vit takes a ViT with a position encoding attached (attach_position_encoding); "
                         f"got {type(model).__name__}")
    spec = model.pe.inner.spec
    if spec is None:
        raise ValueError(f"{type(model.pe.inner).__name__} was constructed directly, so its config and space are "
                         "unknown and load_vit could not rebuild it; build it with build_position_encoding")
    arguments = vit_arguments(model)
    want, got = _structure(_build(arguments, "meta")), _structure(model)
    if want != got:
        diff = next((a for a, b in zip(want, got) if a != b), "the number of modules")
        raise ValueError(f"save_vit cannot describe this VisionTransformer by its arguments (first difference: "
                         f"{diff}); save its state_dict with safetensors instead")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS))
    config = {"format": FORMAT, "seqpe_nd": seqpe_nd.__version__,
              "architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
              "vit": arguments, "position_encoding": spec.model_dump(mode="json")}
    atomic_write_text(out / CONFIG, json.dumps(config, indent=1) + "\n")
    return out


def load_vit(directory: str | Path, *, device: str | torch.device = "cpu") -> VisionTransformerWithPE:
    """The model :func:`save_vit` wrote to ``directory``, in eval mode (as ``from_pretrained`` returns models)."""
    path = Path(directory)
    config_file = path / CONFIG
    if not config_file.is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: a saved ViT has {CONFIG} and {WEIGHTS} (written by save_vit)")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format is {config.get('format')!r}; allowed: {FORMAT!r} (written by save_vit)")
    model = _build(config["vit"], device)
    spec = PESpec.model_validate(config["position_encoding"])
    pe = build_position_encoding(spec.config, space=spec.space, **vit_sizes(model))
    attached = attach_vit(model, pe.to(device))
    attached.load_state_dict(load_file(str(path / WEIGHTS), device=str(device)), strict=True)
    return attached.eval()

"""What the ViT-family recipes (``vit``, ``video``, ``hybrid``) share: the transformer's shape settings and the
classification step. Each recipe subclasses :class:`TransformerShape` with its own defaults and fields."""

from collections.abc import Callable

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from seqpe_nd.encodings import PEDraws
from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.recipes.base import StepOutput
from seqpe_nd.tasks.recipes.config import check_multiples


class TransformerShape(Frozen):
    """The transformer of a ViT-family recipe (``model:``): ViT-S/16 unless a recipe sets other defaults."""

    img_size: PositiveInt = 224
    """Training image size R in pixels (square); the space's L is R / patch_size per axis."""
    patch_size: PositiveInt = 16
    """Patch size."""
    embed_dim: PositiveInt = 384
    """Width."""
    depth: PositiveInt = 12
    """Blocks."""
    num_heads: PositiveInt = 6
    """Attention heads."""
    mlp_ratio: float = Field(4.0, gt=0)
    """MLP width ratio."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth (DeiT ViT-S: 0.1)."""

    def check_shape(self, *, width: bool = True) -> None:
        """A whole number of patches per side and (with ``width``) of dims per head, named as fields."""
        check_multiples(img_size=(self.img_size, "patch_size", self.patch_size))
        if width:
            check_multiples(embed_dim=(self.embed_dim, "num_heads", self.num_heads))


def classification_step(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, shift: Tensor | None, draws: PEDraws | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> StepOutput:
    """One training forward of a ViT-family classifier: each input's own start shift (App. A.5) as its position
    offset, the task loss in fp32, the PE's auxiliary loss and logs, and top-1 for hard targets."""
    offset = None if shift is None else shift.to(inputs.device, non_blocking=True)  # (b, w)
    out = model(inputs, pos_offset=offset, pe_draws=draws, pe_shifted=shift is not None)
    main = loss_fn(out.logits.float(), targets)
    extra = {"train_top1": 100.0 * (out.logits.argmax(-1) == targets).float().mean()} if targets.ndim == 1 else {}
    return StepOutput(main, out.pe_aux_loss, out.pe_logs, extra)

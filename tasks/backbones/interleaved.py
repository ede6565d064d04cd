"""An interleaved text + image transformer with any position encoding.

A small stack of timm ``Block``s whose attention is the ViT adapter's
:class:`~seqpe_nd.tasks.backbones.vit.PEAttention` (timm's ``Attention`` with ``pe.attend`` in
place of SDPA), over ``[text token embeddings | timm PatchEmbed patches]`` placed in layout
order. Each image's answer score (a match logit of its own) is read at the text token right after
its patches, the ``[/image]`` marker (:func:`readout_slots`), or from the mean of its patches,
through one linear layer, so any number of images can be scored. The markers are identical
tokens: which image a marker reads out must come from the positions the PE sees, which are the
caller's (hybrid ones, or a flat 1-D index).

Legend: b batch, k images, c channels, y/x pixels, n text tokens, s sequence tokens, w position
width, d model dim.
"""

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from seqpe_nd.encodings.base import PEDraws, PositionEncoding
from seqpe_nd.tasks.backbones.vit import ForwardContext, PEAttention, PEHub, PEOutput


def readout_slots(is_image: Bool[Tensor, " s"], images: int | None = None) -> Int[Tensor, " k"]:
    """The sequence slot of each image's readout: the text token right after its last patch. With the number of
    ``images`` known, the slots have a static shape (``torch.compile`` traces them; the layout check runs eagerly)."""
    last = is_image & ~torch.cat([is_image[1:], is_image.new_ones(1)])  # last patch of each image
    if images is not None and torch.compiler.is_compiling():
        return torch.nonzero_static(last, size=images)[:, 0] + 1
    ends = torch.nonzero(last)[:, 0]
    if bool(is_image[-1]) or bool(is_image[ends + 1].any()) or (images is not None and len(ends) != images):
        raise ValueError("every image must be followed by a text token (its [/image] readout) in the layout")
    return ends + 1


class InterleavedTransformer(nn.Module):
    """timm ``Block``s with :class:`PEAttention` over interleaved text tokens and image patches."""

    def __init__(
        self,
        pe: PositionEncoding,
        *,
        vocab_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        readout: Literal["marker", "mean"] = "marker",
        num_classes: int = 0,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.readout = readout
        pe.check_fits(num_layers=depth, num_heads=num_heads, head_dim=embed_dim // num_heads)
        self.text_embed = nn.Embedding(vocab_size, embed_dim)
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], attn_layer=PEAttention)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.score = nn.Linear(embed_dim, 1)
        self.classify = nn.Linear(embed_dim, num_classes) if num_classes else None  # an auxiliary label per image
        self.apply(init_weights_vit_timm)
        nn.init.trunc_normal_(self.text_embed.weight, std=0.02)
        self.pe = pe
        self._hub = PEHub.bound(pe, self.blocks)

    def forward(
        self,
        text: Int[Tensor, "b n"],
        images: Float[Tensor, "b k c y x"],
        positions: Int[Tensor, "b s w"],
        is_image: Bool[Tensor, " s"],
        *,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
        pe_draws: PEDraws | None = None,
    ) -> PEOutput:
        """Scores of each image for a batch sharing one layout.

        Args:
            positions: what the PE is given for every sequence token (its own position view).
            is_image: which sequence slots hold patches (row-major, image after image); the others
                take the text tokens in order.
        """
        B, K = images.shape[:2]
        t_emb = self.text_embed(text)  # (b, n, d)
        patches = self.patch_embed(images.flatten(0, 1))  # (b*k, gy, gx, d)
        per_image = patches.shape[1] * patches.shape[2]
        p_emb = patches.reshape(B, K * per_image, -1)  # (b, k*p, d)
        if not torch.compiler.is_compiling() and (
            int(is_image.sum()) != K * per_image or int((~is_image).sum()) != text.shape[1]
        ):  # a host read: checked eagerly, not traced
            raise ValueError(
                f"layout has {int(is_image.sum())} patch and {int((~is_image).sum())} text slots, the batch "
                f"{K} images × {per_image} patches and {text.shape[1]} text tokens"
            )
        # Sequence slot -> source row in [text | patches] (the slot's rank among its kind): one gather, static shapes.
        patch_rank, text_rank = is_image.long().cumsum(0) - 1, (~is_image).long().cumsum(0) - 1
        src = torch.where(is_image, text.shape[1] + patch_rank, text_rank)
        x = torch.cat([t_emb, p_emb], 1)[:, src]  # (b, s, d)

        state = self.pe.prepare(positions, generator=pe_generator, shifted=pe_shifted, draws=pe_draws)
        self._hub.current = ForwardContext(generator=pe_generator, shifted=pe_shifted, draws=pe_draws, state=state)
        try:
            e = self.pe.embed(state)
            if e is not None:
                x = x + e.to(x.dtype)
            x = self.norm(self.blocks(x))
        finally:
            self._hub.current = None
        if self.readout == "mean":  # each image's own patches, averaged
            slots = torch.nonzero_static(is_image, size=K * per_image)[:, 0]
            pooled = x[:, slots].reshape(B, K, per_image, -1).mean(2)  # (b, k, d)
        else:  # the [/image] word just after each image, which must find its image through positions
            pooled = x[:, readout_slots(is_image, K)]  # (b, k, d)
        classes = None if self.classify is None else self.classify(pooled)  # (b, k, C)
        return PEOutput(self.score(pooled).squeeze(-1), state.aux_loss, state.logs, classes)

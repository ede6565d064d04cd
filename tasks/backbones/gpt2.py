"""Hugging Face GPT-2 with any position encoding (see :mod:`seqpe_nd.tasks.backbones.causal_lm` for the seams).

GPT-2's own position seam is ``transformer.wpe``, the learned lookup by index: it becomes
:class:`NoPositionLookup`, a zero, and the PE's ``embed`` hook (APE, SeqPE ``input_add``) is added
to the token embeddings instead.
"""


import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.tasks.backbones.causal_lm import (
    ATTN_IMPLEMENTATION,
    CausalLMOutputWithPE,
    PEForward,
    PositionEncodingLM,
    TransformedKeys,
)

__all__ = ["ATTN_IMPLEMENTATION", "CausalLMOutputWithPE", "GPT2WithPE", "NoPositionLookup", "PEForward", "TransformedKeys"]


class NoPositionLookup(nn.Module):
    """Stands in for GPT-2's ``wpe``: positions enter through the PositionEncoding, never by index."""

    def forward(self, position_ids: Tensor) -> Tensor:
        return torch.zeros((), device=position_ids.device)  # a 0-d zero broadcasts and keeps the embedding dtype


def check_gpt2_config(config: GPT2Config) -> None:
    """Refuse GPT-2 options whose behaviour the PE's attention would silently drop."""
    unsupported = {
        "reorder_and_upcast_attn": (config.reorder_and_upcast_attn, False),  # an eager-only code path
        "add_cross_attention": (config.add_cross_attention, False),
    }
    for name, (value, needed) in unsupported.items():
        if bool(value) != needed:
            raise ValueError(f"GPT2Config.{name} = {value} is not supported by GPT2WithPE (allowed: {needed})")
    if config.n_embd % config.n_head:
        raise ValueError(f"GPT2Config.n_embd = {config.n_embd} must be divisible by n_head = {config.n_head}")


class GPT2WithPE(PositionEncodingLM, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` whose positions come from a :class:`PositionEncoding` ``pe``.

    ``forward`` takes the stock arguments; ``position_ids`` may be ``(b, n)`` or explicit
    ``(b, n, w)`` coordinates. Without them, positions continue after the cached keys, or count
    the real tokens of ``attention_mask`` (left padding), or start at 0. ``pe_shifted`` tells the
    PE that this training step uses shifted positions (the OOD loss is then skipped);
    ``pe_generator`` drives the PE's regularizer sampling.
    """

    def __init__(self, config: GPT2Config, pe: PositionEncoding) -> None:
        check_gpt2_config(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config)
        self.transformer.wpe = NoPositionLookup()  # the wpe seam
        self.pe = pe

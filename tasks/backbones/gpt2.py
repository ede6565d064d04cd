"""Hugging Face GPT-2 with any position encoding (see :mod:`seqpe_nd.tasks.backbones.causal_lm` for the seams).

GPT-2's own position seam is ``transformer.wpe``, the learned lookup by index: it becomes
:class:`NoPositionLookup`, a zero, and the PE's ``embed`` hook (APE, SeqPE ``input_add``) is added
to the token embeddings instead. :class:`StockGPT2` keeps ``wpe``: the stock model, as a control.
``GPT2WithPE`` saves under the model type ``seqpe_nd_gpt2`` (:class:`GPT2ConfigWithPE`) and loads back with
``GPT2WithPE.from_pretrained`` (or ``AutoModelForCausalLM`` after importing
:mod:`seqpe_nd.tasks.backbones.huggingface`).

Legend: b batch, n tokens, w coordinates per position.
"""

from typing import Any


import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd.encodings.base import PEDraws, PositionEncoding
from seqpe_nd.tasks.backbones.causal_lm import (
    ATTN_IMPLEMENTATION,
    CausalLMOutputWithPE,
    PEForward,
    PositionEncodingLM,
    TransformedKeys,
    pe_config_class,
)

__all__ = [
    "ATTN_IMPLEMENTATION", "CausalLMOutputWithPE", "GPT2ConfigWithPE", "GPT2Seam", "GPT2WithPE", "NoPositionLookup", "PEForward",
    "StockGPT2", "TransformedKeys",
]

GPT2ConfigWithPE = pe_config_class(GPT2Config, __name__)


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


class GPT2Seam:
    """GPT-2's own positions: the learned lookup ``transformer.wpe``, which becomes :class:`NoPositionLookup`."""

    def check(self, config: GPT2Config) -> None:
        check_gpt2_config(config)

    def sizes(self, config: GPT2Config) -> dict[str, int]:
        return dict(num_heads=config.n_head, head_dim=config.n_embd // config.n_head, num_layers=config.n_layer,
                    d_model=config.n_embd)

    def remove(self, model: nn.Module) -> None:
        model.transformer.wpe = NoPositionLookup()  # type: ignore[union-attr]


class GPT2WithPE(PositionEncodingLM, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` whose positions come from a :class:`PositionEncoding` ``pe``.

    ``forward`` takes the stock arguments; ``position_ids`` may be ``(b, n)`` or explicit
    ``(b, n, w)`` coordinates. Without them, positions continue after the cached keys, or count
    the real tokens of ``attention_mask`` (left padding), or start at 0. ``pe_shifted`` tells the
    PE that this training step uses shifted positions (the OOD loss is then skipped);
    ``pe_generator`` drives the PE's regularizer sampling, or ``pe_draws`` (``pe.draw(generator)``) gives it.

    ``GPT2WithPE(config, pe)`` is a fresh model; ``GPT2WithPE.from_pretrained(dir)`` rebuilds the PE its saved
    config records (``from_pretrained(dir, pe=pe)`` checks that ``pe`` is that one).
    """

    config_class = GPT2ConfigWithPE
    seam = GPT2Seam()

    def __init__(self, config: GPT2Config, pe: PositionEncoding | None = None) -> None:
        super().__init__(config, pe)


class StockGPT2(GPT2LMHeadModel):
    """Transformers' own ``GPT2LMHeadModel``, its learned ``wpe`` included: Table 1's control for the APE rows.

    Weights, initialisation and forward are the stock model's (same config and seed, same logits). Only the call
    takes the recipes' arguments: ``(b, n, 1)`` position ids are GPT-2's ``(b, n)`` ones (passed on, so ``wpe`` is
    looked up at the positions the recipe gives), ``pe_generator`` and ``pe_draws`` are unused (nothing samples),
    ``pe_shifted`` must
    be False (positions past ``n_positions`` have no row), and the output has ``pe_aux_loss = None``.
    """

    def forward(  # type: ignore[override]
        self,
        input_ids: Int[Tensor, "b n"] | None = None,
        *,
        position_ids: Int[Tensor, "#b n"] | Int[Tensor, "#b n 1"] | None = None,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
        pe_draws: PEDraws | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPE:
        if pe_shifted:
            raise ValueError("the stock GPT-2 has no position encoding to shift; train it with random_shift: false")
        if kwargs.get("return_dict") is False:
            raise ValueError("StockGPT2 always returns a CausalLMOutputWithPE; return_dict=False is not supported")
        if position_ids is not None and position_ids.ndim == 3:
            if position_ids.shape[-1] != 1:
                shape = tuple(position_ids.shape)
                raise ValueError(f"the stock GPT-2 has 1-D positions; got position_ids of shape {shape}")
            position_ids = position_ids[..., 0]  # (b, n)
        out = super().forward(input_ids, position_ids=position_ids, **kwargs)
        return CausalLMOutputWithPE(**dict(out.items()), lm_loss=out.loss, pe_aux_loss=None, pe_logs=None)

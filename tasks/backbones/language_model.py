"""The causal LM of the LM and QA recipes, built from its ``model:`` section: Hugging Face GPT-2 or a Llama of
the same shape, with a PositionEncoding in place of its own positions; or the stock GPT-2 with its own."""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator
from torch import nn
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from seqpe_nd.encodings import NoPEConfig, PEConfig, build_position_encoding, load_pe_config
from seqpe_nd.positions import Frozen, GridSpace
from seqpe_nd.tasks.backbones.huggingface import attach_position_encoding
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE, StockGPT2


class LMSettings(Frozen):
    """The causal LM backbone (``model:``): GPT-2, or a Llama with the same shape; the vocabulary comes from the tokenizer."""

    arch: Literal["gpt2", "llama", "gpt2_stock"] = "gpt2"
    """``gpt2``: Hugging Face GPT-2; ``llama``: a Hugging Face Llama (RMSNorm, SwiGLU MLP of about GPT-2's
    parameters, grouped-query attention with ``kv_heads``) with the PE attached by ``attach_position_encoding``;
    ``gpt2_stock``: the stock ``GPT2LMHeadModel`` with its own learned ``wpe`` (needs ``pe: {method: nope}``), a
    control for the APE rows."""
    n_layer: PositiveInt = 12
    """Transformer blocks."""
    n_head: PositiveInt = 12
    """Attention heads per block."""
    n_embd: PositiveInt = 768
    """Model width; divisible by n_head."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Residual, embedding and attention dropout (the paper: 0.1)."""
    block_size: PositiveInt = 512
    """Training length L in tokens; must equal the position space's L."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of the normal weight init (``initializer_range``)."""
    kv_heads: PositiveInt | None = None
    """``llama`` only: key/value heads (grouped-query attention); None: n_head."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "LMSettings":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd = {self.n_embd} must be divisible by n_head = {self.n_head}")
        if self.kv_heads is not None and (self.arch != "llama" or self.n_head % self.kv_heads):
            raise ValueError(f"kv_heads = {self.kv_heads} needs arch: llama and must divide n_head = {self.n_head}")
        return self


def gpt2_config(settings: LMSettings, *, vocab_size: int, eos_id: int, n_positions: int | None = None) -> GPT2Config:
    """The stock ``GPT2Config`` of the backbone. ``n_positions``: rows of the stock model's ``wpe``; default the
    training length, which is all it documents when a PE replaces ``wpe``."""
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions or settings.block_size, n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head, resid_pdrop=settings.dropout, embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout, initializer_range=settings.init_std,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def llama_config(settings: LMSettings, *, vocab_size: int, eos_id: int) -> LlamaConfig:
    """A stock ``LlamaConfig`` of the same shape (SwiGLU width 8/3 d, rounded up to 16: about GPT-2's MLP parameters)."""
    m = settings
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.n_embd, intermediate_size=-(-8 * m.n_embd // 3 // 16) * 16,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads or m.n_head,
        max_position_embeddings=m.block_size, attention_dropout=m.dropout, initializer_range=m.init_std,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False,
    )


def build_lm(
    settings: LMSettings, pe_config: PEConfig | Mapping[str, Any], space: GridSpace, *, vocab_size: int, eos_id: int,
    max_positions: int | None = None,
) -> nn.Module:
    """A randomly initialised causal LM (``settings.arch``) whose positions come from ``pe_config`` on ``space``.

    An APE-sin without a ``scale`` gets the sinusoid RMS (1/√2 per coordinate) matched to GPT-2's
    N(0, init_std) token embeddings, i.e. amplitude init_std·√2 (``APESinConfig.for_embeddings``).
    ``gpt2_stock`` takes its positions from its own ``wpe`` of ``max_positions`` rows (default
    ``block_size``: give the longest length it will be evaluated at), so ``pe_config`` must be NoPE.
    """
    pe_config = load_pe_config(pe_config)  # a config model, or a mapping as benchmarks pass
    if settings.arch == "gpt2_stock":
        if not isinstance(pe_config, NoPEConfig):
            raise ValueError(f"model.arch = gpt2_stock keeps GPT-2's own learned wpe as its position encoding; "
                             f"pe must be {{method: nope}}, got method {pe_config.method!r}")
        config = gpt2_config(settings, vocab_size=vocab_size, eos_id=eos_id, n_positions=max_positions)
        return StockGPT2(config)
    pe_config = pe_config.for_embeddings(settings.init_std)  # APE-sin: its amplitude matched to the tokens'
    m = settings
    pe = build_position_encoding(
        pe_config, space=space, num_heads=m.n_head, head_dim=m.n_embd // m.n_head, num_layers=m.n_layer,
        d_model=m.n_embd,
    )
    if m.arch == "llama":
        return attach_position_encoding(LlamaForCausalLM(llama_config(m, vocab_size=vocab_size, eos_id=eos_id)), pe)
    return GPT2WithPE(gpt2_config(m, vocab_size=vocab_size, eos_id=eos_id), pe)

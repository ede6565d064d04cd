"""Hugging Face causal LMs with a position encoding: attach one to a model you have, save it, load it back.

``attach_position_encoding(model, pe)`` puts ``pe`` into a stock ``GPT2LMHeadModel`` or a Llama-family model
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``, or any whose layers apply the
``position_embeddings`` of ``model.model.rotary_emb``), in place and keeping its weights; ``pe_sizes(model)`` gives
the sizes to build ``pe`` for it (``build_position_encoding(cfg, space=..., **pe_sizes(model))``). The model then saves
with ``save_pretrained`` under a model type of its own, ``seqpe_nd_<stock type>``, its ``config.json`` recording
the PE's config and position space under ``"position_encoding"``.

Importing this module registers those model types with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (:func:`register_causal_lm`), so that afterwards
``AutoModelForCausalLM.from_pretrained(dir)`` returns the model with its PE rebuilt and loaded. Without the
import, the Auto classes refuse the unknown model type; the stock class (``LlamaForCausalLM.from_pretrained``)
warns that the checkpoint's model type is ``seqpe_nd_…``, not its own, and lists the ``pe.*`` weights it drops.

Legend: b batch, n tokens, e head dim.
"""

from typing import Any

from torch import Tensor, nn
from transformers import (
    TrainerCallback,
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.tasks.backbones.causal_lm import PositionEncodingLM, pe_config_class
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE
from seqpe_nd.tasks.backbones.pe_logs import pop_pe_logs

__all__ = [
    "LlamaForCausalLMWithPE", "MistralForCausalLMWithPE", "NoRotary", "Qwen2ForCausalLMWithPE", "RotaryPositionLM",
    "RotarySeam",
    "adapted_class", "attach_position_encoding", "pe_sizes", "register_causal_lm", "register_rotary_lm",
]


class NoRotary(nn.Module):
    """Stands in for a Llama-family ``rotary_emb``: cos = 1, sin = 0, so the model's own rotation is the identity
    (exactly: ``q·1 + rotate_half(q)·0 = q``) and positions enter only through the PositionEncoding."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        shape = (*position_ids.shape, self.head_dim)
        return x.new_ones(shape), x.new_zeros(shape)


class RotarySeam:
    """A Llama-family model's own positions: ``model.rotary_emb``, which gives way to :class:`NoRotary`."""

    def check(self, config: PreTrainedConfig) -> None:
        """Every Llama-family option works with the PE's attention: nothing to refuse."""

    def sizes(self, config: PreTrainedConfig) -> dict[str, int]:
        heads = config.num_attention_heads
        # Qwen2's config has no head_dim (its attention derives it so); Llama's and Mistral's may set another one.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return dict(num_heads=heads, head_dim=head_dim, num_layers=config.num_hidden_layers, d_model=config.hidden_size)

    def remove(self, model: nn.Module) -> None:
        model.model.rotary_emb = NoRotary(self.sizes(model.config)["head_dim"])  # type: ignore[union-attr]


class RotaryPositionLM(PositionEncodingLM):
    """A Llama-family model with a PE: its ``model.rotary_emb`` gives way to :class:`NoRotary`."""

    seam = RotarySeam()


_ADAPTED: dict[type, type] = {}  # stock causal LM class -> its PE class


def register_causal_lm(stock: type[PreTrainedModel], adapted: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """Register ``adapted`` (``stock`` with a PE) with ``AutoConfig`` and ``AutoModelForCausalLM`` under its config
    class's model type, and as the class :func:`attach_position_encoding` turns a ``stock`` model into."""
    config_class = adapted.config_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, adapted, exist_ok=True)
    _ADAPTED[stock] = adapted
    return adapted


def adapted_class(stock: type) -> type[PreTrainedModel] | None:
    """The registered PE class of a stock causal LM class, if any."""
    return _ADAPTED.get(stock)


def register_rotary_lm(stock: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The PE class of a Llama-family causal LM class (``<Stock>WithPE``), created and registered once.

    Llama, Qwen2 and Mistral are registered on import; call this for another family before loading its saved
    directory in a fresh process (``attach_position_encoding`` calls it when it first meets the family).
    """
    if (known := adapted_class(stock)) is not None:
        return known
    config_class = pe_config_class(stock.config_class, __name__)
    adapted = type(f"{stock.__name__}WithPE", (RotaryPositionLM, stock), {
        "__module__": __name__, "config_class": config_class,
        "__doc__": f"``{stock.__name__}`` whose positions come from a PositionEncoding ``pe`` (see RotaryPositionLM).",
    })
    return register_causal_lm(stock, adapted)


register_causal_lm(GPT2LMHeadModel, GPT2WithPE)
LlamaForCausalLMWithPE = register_rotary_lm(LlamaForCausalLM)
Qwen2ForCausalLMWithPE = register_rotary_lm(Qwen2ForCausalLM)
MistralForCausalLMWithPE = register_rotary_lm(MistralForCausalLM)
# Bound by name, so the classes and their configs pickle.
LlamaConfigWithPE = LlamaForCausalLMWithPE.config_class
Qwen2ConfigWithPE = Qwen2ForCausalLMWithPE.config_class
MistralConfigWithPE = MistralForCausalLMWithPE.config_class


CAUSAL_LMS = (
    "Hugging Face causal LMs of the GPT-2 family (GPT2LMHeadModel) and the Llama family (LlamaForCausalLM, "
    "Qwen2ForCausalLM, MistralForCausalLM, or any with a .model.rotary_emb seam)"
)
"""The models :func:`attach_position_encoding` takes, as its error names them."""


def pe_sizes(model_or_config: Any) -> dict[str, int]:
    """``num_heads``, ``head_dim``, ``num_layers`` and ``d_model`` of a Hugging Face causal LM or its config: the
    sizes :func:`~seqpe_nd.encodings.build_position_encoding` takes for a PE that :func:`attach_position_encoding`
    will accept, ``build_position_encoding(cfg, space=space, **pe_sizes(model))``.

    GPT-2 (``GPT2Config``: ``n_head``, ``n_embd``, ``n_layer``) and the Llama family (``num_attention_heads``,
    ``hidden_size``, ``num_hidden_layers``; ``head_dim`` where the config sets one, else ``hidden_size //
    num_attention_heads``, as Qwen2's attention does).
    """
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, GPT2Config):
        return GPT2WithPE.seam.sizes(config)
    if isinstance(config, PreTrainedConfig) and all(
        hasattr(config, name) for name in ("num_attention_heads", "hidden_size", "num_hidden_layers")
    ):
        return RotaryPositionLM.seam.sizes(config)
    raise ValueError(
        f"pe_sizes reads the config of a GPT-2 or Llama-family causal LM (GPT2Config, or one with num_attention_heads, "
        f"hidden_size and num_hidden_layers); got {type(config).__name__}"
    )


def attach_position_encoding(model: nn.Module, pe: PositionEncoding) -> Any:
    """Put ``pe`` into a stock Hugging Face causal LM, in place, keeping its weights; returns the model.

    GPT-2 (``GPT2LMHeadModel``): ``transformer.wpe`` gives way to the PE, as in ``GPT2WithPE`` (whose class the
    model takes). Llama family: the rotary module gives way to :class:`NoRotary` (its rotation becomes the
    identity). Either way every layer's attention runs through ``pe.attend`` with explicit positions
    (grouped-query attention included), ``pe.embed`` is added to the token embeddings, the output carries the
    PE's auxiliary loss (``pe_aux_loss``), and the config records the PE (when ``build_position_encoding`` built
    it), so ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` give the same model back.
    """
    if isinstance(model, PositionEncodingLM):
        raise ValueError(f"{type(model).__name__} already has a position encoding attached")
    cls = adapted_class(type(model))
    inner = getattr(model, "model", None)
    if cls is None and isinstance(getattr(inner, "rotary_emb", None), nn.Module) and isinstance(model, PreTrainedModel):
        cls = register_rotary_lm(type(model))  # another Llama-family model: the same seam
    if cls is None:
        raise ValueError(
            f"attach_position_encoding supports {CAUSAL_LMS}; got {type(model).__name__}"
        )
    assert issubclass(cls, PositionEncodingLM)
    cls.seam.check(model.config)
    cls.pe_record(model.config, pe)  # every check before the model changes
    model.__class__ = cls
    model.install_position_encoding(pe)
    return model


class PELogCallback(TrainerCallback):
    """Puts the PE's training parts into a ``transformers.Trainer``'s logs: ``pe/loss_delta``, ``pe/loss_ood``, ...
    (SeqPE), each the mean over the training forwards since the previous log.

    The loss the Trainer optimizes already includes the PE's auxiliary loss (the model's ``loss`` with labels);
    this callback only reports its parts: ``Trainer(model=model, ..., callbacks=[PELogCallback()])``.
    """

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               model: nn.Module | None = None, **kwargs: Any) -> None:
        parts = pop_pe_logs(model) if model is not None else {}
        if parts and logs is not None and "loss" in logs:  # a training log, not an evaluation one
            logs.update(parts)
            if state.log_history:
                state.log_history[-1].update(parts)

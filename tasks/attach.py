"""Your own model with a position encoding, from one import.

    from seqpe_nd.tasks.attach import attach_position_encoding, pe_sizes, param_groups, save_vit, load_vit

- :func:`attach_position_encoding` puts a PE into a model you already have, in place, keeping its weights:
  a Hugging Face causal LM of the GPT-2 or Llama family (Qwen2, Mistral, ...), or a timm
  ``VisionTransformer`` (``timm.create_model("vit_...")``).
- :func:`pe_sizes` gives the sizes to build the PE with: ``build_position_encoding(cfg, space=space,
  **pe_sizes(model))``.
- :func:`param_groups` gives AdamW parameter groups (the encoder's learning-rate scale, no decay on biases,
  norms and position tables).
- Training: with labels, a Hugging Face PE model's ``out.loss`` is the loss to optimize (the LM loss plus the
  PE's auxiliary loss; ``out.lm_loss`` alone), so ``transformers.Trainer`` and any loop that optimizes
  ``loss`` train SeqPE with its regularizers; :class:`PELogCallback` adds their parts to the Trainer's logs.
- Save and load: Hugging Face models with ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
  (importing this module registers the PE model classes); timm ViTs with :func:`save_vit` and :func:`load_vit`.
"""

from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.tasks.backbones import huggingface
from seqpe_nd.tasks.backbones.huggingface import PELogCallback
from seqpe_nd.tasks.backbones.timm_vit import VisionTransformerWithPE, attach_vit, load_vit, save_vit, vit_sizes
from seqpe_nd.tasks.engine.param_groups import param_groups

__all__ = ["attach_position_encoding", "pe_sizes", "param_groups", "save_vit", "load_vit", "VisionTransformerWithPE",
           "PELogCallback"]

SUPPORTED = f"{huggingface.CAUSAL_LMS}, and timm's VisionTransformer (timm.create_model('vit_...'))"


def attach_position_encoding(model: nn.Module, pe: PositionEncoding) -> Any:
    """Put ``pe`` into ``model`` in place, keeping its weights; returns the model.

    Hugging Face LMs: see :func:`seqpe_nd.tasks.backbones.huggingface.attach_position_encoding` (the output
    carries ``pe_aux_loss``). timm ViTs: see :func:`seqpe_nd.tasks.backbones.timm_vit.attach_vit` (the
    forward returns timm's logits; ``model.pe_aux_loss`` holds the PE's auxiliary loss after each call).
    """
    if isinstance(model, VisionTransformer):
        return attach_vit(model, pe)
    if isinstance(model, PreTrainedModel):
        return huggingface.attach_position_encoding(model, pe)
    raise ValueError(f"attach_position_encoding supports {SUPPORTED}; got {type(model).__name__}")


def pe_sizes(model_or_config: Any) -> dict[str, int]:
    """``num_heads``, ``head_dim``, ``num_layers`` and ``d_model`` of a supported model (or a Hugging Face config)."""
    if isinstance(model_or_config, VisionTransformer):
        return vit_sizes(model_or_config)
    if isinstance(model_or_config, (PreTrainedModel, PreTrainedConfig)):
        return huggingface.pe_sizes(model_or_config)
    raise ValueError(f"pe_sizes reads {SUPPORTED}, or a Hugging Face config; got {type(model_or_config).__name__}")

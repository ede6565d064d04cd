"""The position-encoding configs as one discriminated union on ``method``, and the factory.

Each method's config lives beside its encoding (``absolute``, ``rotary``, ``multimodal``, ``alibi``,
``seqpe``) and knows the spaces it runs on and how it builds itself (:class:`~seqpe_nd.encodings.method.
MethodConfig`); a new method is its module plus one line of the union below. A RoPE option cannot reach
ALiBi: each config forbids unknown fields, so a typo or an option of another method is an error naming the
field, and an unknown ``method`` lists the valid ones.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, Field, TypeAdapter

from seqpe_nd.encodings.absolute import APELearnConfig, APESinConfig, NoPEConfig
from seqpe_nd.encodings.alibi import ALiBiConfig, ALiBiNDConfig
from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.encodings.multimodal import MultimodalRoPEConfig
from seqpe_nd.encodings.rotary import RoPEAxialConfig, RoPEConfig, RoPEMixedConfig, RoPEScaling
from seqpe_nd.encodings.seqpe import SeqPEConfig
from seqpe_nd.positions import Frozen, GridSpace, HybridSpace, PositionSpace, load_space
from seqpe_nd.positions.errors import validated
from seqpe_nd.positions.spaces import read_yaml_mapping

__all__ = [
    "PEConfig", "METHODS", "PESpec", "load_pe_config", "build_position_encoding", "MethodConfig", "RoPEScaling",
    "NoPEConfig", "APESinConfig", "APELearnConfig", "RoPEConfig", "RoPEAxialConfig", "RoPEMixedConfig",
    "MultimodalRoPEConfig", "ALiBiConfig", "ALiBiNDConfig", "SeqPEConfig",
]

PEConfig = Annotated[
    NoPEConfig
    | APESinConfig
    | APELearnConfig
    | RoPEConfig
    | RoPEAxialConfig
    | RoPEMixedConfig
    | MultimodalRoPEConfig
    | ALiBiConfig
    | ALiBiNDConfig
    | SeqPEConfig,
    Field(discriminator="method"),
]
"""Any position-encoding config; YAML picks one with ``method: <name>``."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(PEConfig)
METHODS: tuple[str, ...] = tuple(c.model_fields["method"].default for c in get_args(get_args(PEConfig)[0]))
"""Every method's name, in the union's order."""


class PESpec(Frozen):
    """What a PositionEncoding is built from, besides the backbone's sizes: its config and its position space.

    ``build_position_encoding`` records it on the encoding (``pe.spec``); a Hugging Face model with a PE saves
    ``spec.model_dump(mode="json")`` in its ``config.json`` and rebuilds the encoding from it on loading.
    """

    config: PEConfig
    """The position-encoding config, as validated (``method`` picks the variant)."""
    space: PositionSpace
    """The position space positions come from (``kind`` picks grid or hybrid)."""


def load_pe_config(source: str | Path | Mapping[str, Any] | BaseModel) -> PEConfig:
    """A validated config from a YAML file (relative to the working directory, else the shipped configs), a dict
    or a config model; a mistake is one ValueError naming the field, the value and what is allowed."""
    if isinstance(source, BaseModel):
        return validated(_ADAPTER, source.model_dump(), model=PEConfig)
    if isinstance(source, (str, Path)):
        data = read_yaml_mapping(source, what="position-encoding config", key="method")
        return validated(_ADAPTER, data, model=PEConfig, source=source)
    if not isinstance(source, Mapping):
        raise ValueError(f"a position-encoding config is a YAML path, a mapping or a config model, got {type(source).__name__}")
    return validated(_ADAPTER, dict(source), model=PEConfig)


def build_position_encoding(
    config: PEConfig | Mapping[str, Any] | str | Path,
    *,
    space: GridSpace | HybridSpace | Mapping[str, Any] | str | Path,
    num_heads: int,
    head_dim: int,
    num_layers: int,
    d_model: int,
) -> PositionEncoding:
    """The PositionEncoding a config names, sized for a backbone.

    Args:
        config: a config model, a dict or a YAML path (validated by ``load_pe_config``).
        space: the position space positions come from (fixes their width and dimensionality).
        d_model: width of the input embeddings (``embed``'s output, SeqPE's encoder output).

    The returned encoding's ``spec`` records ``config`` and ``space`` (a :class:`PESpec`).
    """
    cfg: MethodConfig = load_pe_config(config)
    if isinstance(space, (str, Path, Mapping)):
        space = load_space(space)  # a YAML path or a mapping, as everywhere else
    if not isinstance(space, (GridSpace, HybridSpace)):
        raise ValueError(f"space must be a position space, a YAML path or a mapping, got {type(space).__name__}")
    sizes = Sizes(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, d_model=d_model)
    for name, value in sizes._asdict().items():
        if value < 1:
            raise ValueError(f"{name} = {value} must be a positive integer")
    reason = cfg.unsupported(space)
    if reason is not None:
        raise ValueError(reason)
    pe = cfg.build(space, sizes)
    pe.spec = PESpec(config=cfg, space=space)  # what save_pretrained records
    return pe

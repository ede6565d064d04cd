"""Position encodings behind one interface: SeqPE integrations and every baseline.

``build_position_encoding(config, space=…, num_heads=…, head_dim=…, num_layers=…, d_model=…)``
returns a :class:`PositionEncoding`; see :mod:`seqpe_nd.encodings.base` for how an adapter
drives it.
"""

from seqpe_nd.encodings.absolute import APELearn, APESin, NoPE
from seqpe_nd.encodings.alibi import ALiBi, ALiBiND
from seqpe_nd.encodings.base import (
    KVCache, PEDraws, PEState, PositionEncoding, ScoreMod, draws_of, pe_metrics, visibility_mask,
)
from seqpe_nd.encodings.config import (
    METHODS,
    ALiBiConfig,
    ALiBiNDConfig,
    APELearnConfig,
    APESinConfig,
    MultimodalRoPEConfig,
    NoPEConfig,
    PEConfig,
    PESpec,
    RoPEAxialConfig,
    RoPEConfig,
    RoPEMixedConfig,
    SeqPEConfig,
    build_position_encoding,
    load_pe_config,
)
from seqpe_nd.encodings.multimodal import MultimodalRoPE
from seqpe_nd.encodings.prefixed import PrefixedEncoding, PrefixState
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.encodings.rotary import RoPE, RoPEAxial, RoPEMixed
from seqpe_nd.encodings.seqpe import SeqPEEncoding

__all__ = [
    "draws_of",
    "pe_metrics",
    "METHODS",
    "MethodConfig",
    "Sizes",
    "ALiBi",
    "ALiBiConfig",
    "ALiBiND",
    "ALiBiNDConfig",
    "APELearn",
    "APELearnConfig",
    "APESin",
    "APESinConfig",
    "KVCache",
    "MultimodalRoPE",
    "MultimodalRoPEConfig",
    "NoPE",
    "NoPEConfig",
    "PEConfig",
    "PEDraws",
    "PESpec",
    "PEState",
    "PositionEncoding",
    "PrefixState",
    "PrefixedEncoding",
    "RoPE",
    "RoPEAxial",
    "RoPEAxialConfig",
    "RoPEConfig",
    "RoPEMixed",
    "RoPEMixedConfig",
    "ScoreMod",
    "SeqPEConfig",
    "SeqPEEncoding",
    "build_position_encoding",
    "load_pe_config",
    "visibility_mask",
]


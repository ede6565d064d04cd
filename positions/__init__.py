"""Position spaces: N-D coordinates, digit tokens, distances and samplers (no learned weights)."""

from seqpe_nd.positions.digits import from_digits, num_digits, perturb_digits, to_digits
from seqpe_nd.positions.distances import Distance, get_distance, list_distances, register_distance
from seqpe_nd.positions.samplers import ContrastiveBatch, OODBatch, Shift
from seqpe_nd.positions.settings import STRATEGIES, ContrastiveSettings, Frozen, OODSettings, ShiftSettings
from seqpe_nd.positions.spaces import (
    NONE_ID,
    GridSpace,
    HybridSpace,
    Layout,
    Modality,
    PositionSpace,
    Segment,
    Timeline,
    load_space,
    parse_segments,
)

AnySpace = GridSpace | HybridSpace

__all__ = [
    "NONE_ID", "STRATEGIES", "AnySpace", "ContrastiveBatch", "ContrastiveSettings", "Distance", "Frozen", "GridSpace",
    "HybridSpace", "Layout", "Modality", "OODBatch", "OODSettings", "PositionSpace", "Segment", "Shift",
    "ShiftSettings", "Timeline", "from_digits", "get_distance", "list_distances", "load_space", "num_digits",
    "parse_segments", "perturb_digits", "register_distance", "to_digits",
]

"""ALiBi (Press et al.) in 1-D and on any space's distance: a genuine score bias.

Legend: ``b`` batch, ``n``/``m`` query/key tokens, ``w`` position width, ``h`` heads.

The bias is a FlexAttention ``score_mod`` built from RELATIVE distances of explicit positions
(``-m_h · δ(p_i, p_j)``, Eq. 5-6), so it is exact in float32 whatever the absolute positions
(the released code multiplied slopes by absolute key indices and cast to bf16).
"""

from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from pydantic import field_validator
from torch import Tensor

from seqpe_nd.encodings.base import PEState, PositionEncoding, ScoreBackend, ScoreMod
from seqpe_nd.encodings.functional import alibi_slopes
from seqpe_nd.encodings.method import MethodConfig, Sizes
from seqpe_nd.positions import GridSpace, HybridSpace, get_distance


class ALiBi(PositionEncoding):
    """1-D ALiBi: ``A_ij = q_i·k_j - m_h·|i - j|`` with the original geometric slopes (Eq. 6;
    with the causal mask, ``|i - j| = i - j``)."""

    method = "alibi"
    translation_invariant = True  # -m_h·|p_i - p_j|

    def __init__(self, *, backend: ScoreBackend, num_heads: int, head_dim: int, num_layers: int, width: int) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        self.score_backend = backend
        self.register_buffer("slopes", torch.empty(num_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Press et al.'s slopes, recomputed (a non-persistent buffer: see ``PositionEncoding.reset_buffers``)."""
        with torch.no_grad(), torch.device("cpu"):
            self.slopes.copy_(alibi_slopes(self.num_heads))

    def distance(self, a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
        # Subtract the integers, then cast the small difference: casting first rounds positions
        # past 2**24 to float32's grid and loses the difference.
        return (a.long() - b.long()).abs().sum(-1).float()

    def score_mod(self, state: PEState, layer: int) -> ScoreMod:
        """``score - m_h · δ(p_q[b, i], p_k[b, j])``; broadcasts, so it also builds the dense bias."""
        pos_q, pos_k, slopes, dist = state.pos_q, state.pos_k, self.slopes, self.distance

        def alibi(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            return score - slopes[h] * dist(pos_q[b, i], pos_k[b, j]).float()

        return alibi

    def dense_bias(
        self, state: PEState, rows: int, queries: slice = slice(None), keys: int | None = None
    ) -> Float[Tensor, "r h n m"] | None:
        """``-m_h · |i - j|`` in three passes (the distance in int64, one cast, one product with the slopes),
        rather than broadcasting ``score_mod``'s gathers over every (row, head, query, key)."""
        pq, pk = state.pos_q[:rows, queries, 0], state.pos_k[:rows, :keys, 0]
        dist = (pq[:, :, None] - pk[:, None, :]).abs_().to(torch.float32)  # (r, n, m): exact, then cast
        return dist[:, None] * (-self.slopes).view(1, -1, 1, 1)


class ALiBiND(ALiBi):
    """N-D ALiBi: ``-m_h · δ(p_i, p_j)`` with the space's distance (or a named one); works on
    hybrid spaces through their metric. A bias needs no triangle inequality, so non-metric
    distances (``squared_euclidean``: a Gaussian-kernel prior) are allowed."""

    method = "alibi_nd"
    translation_invariant = False  # a registered distance need not depend on p_i - p_j alone

    def __init__(
        self, *, delta: Any, backend: ScoreBackend, num_heads: int, head_dim: int, num_layers: int, width: int
    ) -> None:
        super().__init__(backend=backend, num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, width=width)
        self.delta = delta  # space.delta or a registered Distance

    def distance(self, a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
        return self.delta(a, b)

    def dense_bias(
        self, state: PEState, rows: int, queries: slice = slice(None), keys: int | None = None
    ) -> Float[Tensor, "r h n m"] | None:
        return None  # the space's own distance: broadcast through score_mod


# --- configs ---------------------------------------------------------------------------------------

class ALiBiConfig(MethodConfig):
    """ALiBi on 1-D positions with Press et al.'s slopes (use alibi_nd for N-D)."""

    method: Literal["alibi"] = "alibi"
    backend: ScoreBackend = "auto"
    """Where the bias runs: auto = FlexAttention on CUDA, one dense bias elsewhere; flex; bias."""

    dims: ClassVar[int | None] = 1
    hybrid: ClassVar[bool] = False
    instead: ClassVar[str] = "use alibi_nd, which biases by the space's distance"

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        return ALiBi(backend=self.backend, width=1, **sizes.attention)


class ALiBiNDConfig(MethodConfig):
    """ALiBi on any space: bias -m_h · δ(p_q, p_k) with a distance."""

    method: Literal["alibi_nd"] = "alibi_nd"
    distance: str | None = None
    """Registered distance name; default the space's own distance (a hybrid space's metric)."""
    backend: ScoreBackend = "auto"
    """Where the bias runs: auto = FlexAttention on CUDA, one dense bias elsewhere; flex; bias."""

    @field_validator("distance")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        if name is not None:
            get_distance(name)  # the error lists the valid names
        return name

    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        if isinstance(space, HybridSpace) and self.distance is not None:
            raise ValueError("alibi_nd on a hybrid space uses the space's own metric; leave distance unset")
        delta = space.delta if self.distance is None else get_distance(self.distance)
        return ALiBiND(delta=delta, backend=self.backend, width=space.width, **sizes.attention)

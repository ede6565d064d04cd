"""Prefix tokens ([CLS], registers) around any PositionEncoding.

The image [CLS] token has no grid position (the authors' code gives it its own learned
embedding, not a SeqPE one). :class:`PrefixedEncoding` runs any PositionEncoding on the patch
tokens and leaves prefix tokens position-free inside attention (q/k untransformed, zero-padded
where a method widens them, no score bias), as timm's RoPE ViTs skip prefix tokens. It uses only
the public hooks of :class:`~seqpe_nd.encodings.base.PositionEncoding`, never the method's name.

Legend: b batch, n patch tokens, t all tokens (prefix + patches), w position width, h heads,
e head dim, d model dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from seqpe_nd.encodings.base import PEDraws, PEState, PositionEncoding, ScoreMod


@dataclass(eq=False)
class PrefixState(PEState):
    """State over all tokens (prefix positions are placeholders); ``inner`` is the patch tokens' state."""

    inner: PEState | None = None
    num_prefix: int = 0


class PrefixedEncoding(PositionEncoding):
    """``inner`` on the patch tokens; the first ``num_prefix`` tokens have no position.

    Built only from ``inner``'s public hooks: ``transform_qk`` sees the patch tokens, prefix q/k
    pass unchanged (zero-padded if the method widens q/k, so they add no PE score), and a
    ``score_mod`` bias applies only between patch tokens.
    """

    def __init__(self, inner: PositionEncoding, num_prefix: int) -> None:
        super().__init__(
            num_heads=inner.num_heads, head_dim=inner.head_dim, num_layers=inner.num_layers, width=inner.width
        )
        self.inner, self.num_prefix = inner, num_prefix
        self.method = inner.method
        self.score_backend = inner.score_backend
        self.bias_per_layer = inner.bias_per_layer

    def prepare(
        self,
        pos_q: Int[Tensor, "b n w"],
        pos_k: Int[Tensor, "b m w"] | None = None,
        *,
        generator: torch.Generator | None = None,
        shifted: bool = False,
        draws: PEDraws | None = None,
        grid: tuple[int, ...] | None = None,
    ) -> PrefixState:
        """``inner.prepare`` on the patch positions; placeholders (never read) for the prefix."""
        inner = self.inner.prepare(pos_q, pos_k, generator=generator, shifted=shifted, draws=draws, grid=grid)
        pad = inner.pos_q.new_zeros(inner.pos_q.shape[0], self.num_prefix, inner.pos_q.shape[-1])
        pk = inner.pos_q if inner.pos_k is inner.pos_q else inner.pos_k
        return PrefixState(
            pos_q=torch.cat([pad, inner.pos_q], 1),
            pos_k=torch.cat([pad, pk], 1),
            aux_loss=inner.aux_loss,
            logs=inner.logs,
            shared_rows=inner.shared_rows,
            inner=inner,
            num_prefix=self.num_prefix,
        )

    def draw(self, generator: torch.Generator, *, shifted: bool = False) -> PEDraws | None:
        """``inner``'s draws."""
        return self.inner.draw(generator, shifted=shifted)

    @property
    def transforms_keys(self) -> bool:
        return self.inner.transforms_keys

    def embed(self, state: PEState) -> Float[Tensor, "b t d"] | None:
        """``inner.embed`` of the patch tokens, zero for the prefix (which has its own learned embedding)."""
        e = self.inner.embed(_inner(state))
        return None if e is None else F.pad(e, (0, 0, self.num_prefix, 0))

    def transform_qk(
        self, q: Float[Tensor, "b h t e"], k: Float[Tensor, "b h tk e"], state: PEState, layer: int
    ) -> tuple[Float[Tensor, "b h t eq"], Float[Tensor, "b h tk eq"]]:
        """``inner.transform_qk`` on the patch tokens; prefix q/k unchanged."""
        p = self.num_prefix
        if k.shape[-2] != state.pos_k.shape[1]:
            raise ValueError("PrefixedEncoding has no key-value cache: pass all keys")
        q2, k2 = self.inner.transform_qk(q[:, :, p:], k[:, :, p:], _inner(state), layer)
        widen = q2.shape[-1] - q.shape[-1]  # SeqPE attn_bias concatenates e^q, e^k
        qp, kp = (F.pad(x[:, :, :p], (0, widen)) for x in (q, k))
        return torch.cat([qp, q2], 2), torch.cat([kp, k2], 2)

    def score_mod(self, state: PEState, layer: int) -> ScoreMod | None:
        """``inner``'s bias between patch tokens; none on rows or columns of prefix tokens."""
        mod = self.inner.score_mod(_inner(state), layer)
        if mod is None:
            return None
        p = self.num_prefix

        def shifted(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            inner = mod(score, b, h, (qi - p).clamp_min(0), (ki - p).clamp_min(0))
            return torch.where((qi >= p) & (ki >= p), inner, score)

        return shifted


def _inner(state: PEState) -> PEState:
    if not isinstance(state, PrefixState) or state.inner is None:
        raise TypeError("PrefixedEncoding hooks need the PrefixState its prepare() returned")
    return state.inner

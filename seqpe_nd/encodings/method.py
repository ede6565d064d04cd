"""What every position-encoding method's config is: its fields, the spaces it runs on, how it builds itself.

A method is one module: its :class:`~seqpe_nd.encodings.base.PositionEncoding` and a :class:`MethodConfig`
subclass beside it, with a ``method: Literal["<name>"]`` field, a :meth:`MethodConfig.build` and, where it
does not run on every space, the class variables :attr:`~MethodConfig.dims` / :attr:`~MethodConfig.hybrid`.
``seqpe_nd.encodings.config`` lists the configs in one union (``PEConfig``); the method names, the checks
against a space and the factory all follow from it.
"""

from abc import abstractmethod
from typing import ClassVar, NamedTuple

from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.positions import Frozen, GridSpace, HybridSpace

NO_HYBRID_RULE = (
    "{method} has no rule for hybrid positions (modality id, t, x_1..x_M): its coordinates are not "
    "axes of one grid. Use nope, alibi_nd (the hybrid metric) or seqpe on a hybrid space"
)


class Sizes(NamedTuple):
    """The backbone's sizes an encoding is built for."""

    num_heads: int
    head_dim: int
    num_layers: int
    d_model: int
    """Width of the input embeddings (``embed``'s output, SeqPE's encoder output)."""

    @property
    def attention(self) -> dict[str, int]:
        """The keyword arguments every PositionEncoding constructor takes."""
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "num_layers": self.num_layers}


class MethodConfig(Frozen):
    """Base of every method's config (one frozen pydantic model per method, discriminated on ``method``)."""

    method: str
    dims: ClassVar[int | None] = None
    """The grid dimensionality the method is defined for; None: any."""
    hybrid: ClassVar[bool] = True
    """Whether the method has a rule for hybrid positions."""
    instead: ClassVar[str] = ""
    """What to use on a grid of another dimensionality (ends the error message)."""

    def unsupported(self, space: GridSpace | HybridSpace) -> str | None:
        """Why this method cannot run on ``space`` (one sentence naming what to use instead), or None."""
        if isinstance(space, HybridSpace):
            return None if self.hybrid else NO_HYBRID_RULE.format(method=self.method)
        if self.dims is not None and space.ndim != self.dims:
            return f"{self.method} is {self.dims}-D, but the space is {space.ndim}-D; {self.instead}"
        return None

    def for_embeddings(self, std: float) -> "MethodConfig":
        """This config for a model whose token embeddings are N(0, ``std``): unchanged, unless the method adds a
        fixed-amplitude signal to them and leaves its amplitude unset (APE-sin)."""
        return self

    @abstractmethod
    def build(self, space: GridSpace | HybridSpace, sizes: Sizes) -> PositionEncoding:
        """The encoding this config names on ``space``, sized ``sizes`` (the space is already checked)."""

"""Distance functions between integer positions, looked up by name.

Legend: ``w`` position width (number of coordinates), ``*b`` any batch dims.

A distance takes two integer position tensors that broadcast against each other and returns
one float per pair. YAML refers to distances by name; users add their own with
:func:`register_distance`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

DistanceFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Distance:
    """A registered distance: the function and whether it satisfies the metric axioms."""

    name: str
    fn: DistanceFn
    metric: bool

    def __call__(
        self, a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]
    ) -> Float[Tensor, "*#b"]:
        return self.fn(a, b)


_REGISTRY: dict[str, Distance] = {}


def register_distance(name: str, fn: DistanceFn, *, metric: bool = True, overwrite: bool = False) -> None:
    """Register ``fn(a, b) -> float tensor`` under ``name`` so YAML can refer to it.

    Args:
        metric: whether ``fn`` is a true metric; hybrid spaces accept only metrics.
        overwrite: replace an existing entry instead of raising.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"distance name {name!r} must be a non-empty identifier")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"distance {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = Distance(name=name, fn=fn, metric=metric)


def get_distance(name: str) -> Distance:
    """The registered distance called ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown distance {name!r}; valid distances: {', '.join(list_distances())}") from None


def list_distances() -> list[str]:
    return sorted(_REGISTRY)


def _diff(a: Tensor, b: Tensor) -> Tensor:
    # Subtract in int64, then cast: the difference is exact whatever the absolute coordinates
    # (casting first rounds coordinates past 2**53); float64 keeps squares of differences up to ~9e7 exact.
    return (a.long() - b.long()).to(torch.float64)


def euclidean(a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
    return _diff(a, b).square().sum(-1).sqrt()


def squared_euclidean(a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
    return _diff(a, b).square().sum(-1)


def manhattan(a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
    return _diff(a, b).abs().sum(-1)


def chebyshev(a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
    return _diff(a, b).abs().amax(-1)


register_distance("euclidean", euclidean)
register_distance("squared_euclidean", squared_euclidean, metric=False)  # violates the triangle inequality
register_distance("manhattan", manhattan)
register_distance("chebyshev", chebyshev)

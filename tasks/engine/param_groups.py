"""AdamW parameter groups: weight decay where it belongs, and the SeqPE encoder's own learning rate.

One function, :func:`param_groups`, used by the project's trainer and by a user's own optimizer alike::

    from seqpe_nd.tasks.engine.param_groups import param_groups
    optimizer = torch.optim.AdamW(param_groups(model, lr=3e-4, weight_decay=0.1))

Every PositionEncoding in the model says which of its parameters train at their own multiple of the rate
(:meth:`~seqpe_nd.encodings.base.PositionEncoding.lr_scales`; a SeqPE encoder at ``min(encoder_lr_scale,
encoder_lr_max / lr)``, from its config). Each group carries its ``lr`` (``lr`` times
its scale) and its ``lr_scale``; a schedule keeps the encoder's share by setting ``group["lr"] = rate *
group["lr_scale"]`` each step (as the trainer does; a ``torch.optim.lr_scheduler`` scales every group's
initial ``lr`` alike, which does the same).
"""

from collections.abc import Callable
from typing import Any

from torch import nn

from seqpe_nd.encodings import PositionEncoding

NoDecayRule = Callable[[str, nn.Parameter], bool]
"""``(name, parameter) -> True`` for a parameter trained without weight decay."""


def default_no_weight_decay(model: nn.Module) -> NoDecayRule:
    """The recipes' rule for ``model``: no decay for biases and norms (every parameter of fewer than 2 dims) and
    for every parameter of a PositionEncoding (the released code trains the SeqPE encoder without decay, and
    learned position tables train as APE-learn's do); all other weights, token embeddings included, decay."""
    exempt = {id(p) for m in model.modules() if isinstance(m, PositionEncoding) for p in m.parameters()}
    return lambda name, p: p.ndim < 2 or id(p) in exempt


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, *, no_weight_decay: NoDecayRule | None = None
) -> list[dict[str, Any]]:
    """AdamW groups of ``model``'s trainable parameters, by learning-rate scale, then decayed or not.

    Args:
        model: the model (bare, not DDP- or compile-wrapped), its PE inside.
        lr: the run's peak learning rate; ``encoder_lr_max`` caps the encoder's scale against it.
        weight_decay: AdamW's decoupled decay of the decayed groups (0 in the others).
        no_weight_decay: which parameters train without decay; default :func:`default_no_weight_decay`.

    The groups come in a fixed order: scale 1.0 decayed, scale 1.0 not decayed (both even when empty), then
    other scales in the order of their first parameter. Each has ``params``, ``weight_decay``, ``lr_scale`` and
    ``lr`` (= ``lr * lr_scale``).
    """
    exempt = default_no_weight_decay(model) if no_weight_decay is None else no_weight_decay
    scale_of = {id(p): float(scale) for m in model.modules() if isinstance(m, PositionEncoding)
                for params, scale in m.lr_scales(lr) for p in params}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (scale_of.get(id(p), 1.0), not exempt(name, p))
            groups.setdefault(key, []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale, "lr": lr * scale}
        for (scale, decayed), params in groups.items()
        if params or scale == 1.0
    ]

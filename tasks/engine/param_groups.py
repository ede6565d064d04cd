"""AdamW parameter groups: weight decay where the task allows it, and per-module learning-rate scales and caps."""

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class _DecayRule(Protocol):
    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool: ...


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def param_groups(
    model: nn.Module, task: _DecayRule, weight_decay: float, peak_lr: float | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: decayed parameters and those the task exempts, per learning-rate scale.

    A submodule with a float attribute ``lr_scale`` (a SeqPE encoder's ``encoder_lr_scale``) trains
    its parameters at that multiple of the scheduled rate, and one with ``lr_max`` (``encoder_lr_max``)
    at most at that peak rate: its scale becomes ``min(lr_scale, lr_max / peak_lr)``, so warmup and
    decay keep their shape. Every group carries its ``lr_scale``.
    """
    scale_of: dict[int, float] = {}
    for module in model.modules():
        scale = _number(getattr(module, "lr_scale", None)) or 1.0
        cap = _number(getattr(module, "lr_max", None))
        if cap is not None and peak_lr is not None:
            scale = min(scale, cap / peak_lr)
        if scale != 1.0:
            scale_of.update({id(p): float(scale) for p in module.parameters()})
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (scale_of.get(id(p), 1.0), not task.no_weight_decay(name, p))
            groups.setdefault(key, []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
        for (scale, decayed), params in groups.items()
        if params or scale == 1.0
    ]

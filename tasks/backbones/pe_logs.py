"""The PE's training parts of a Hugging Face model's forwards, kept for a trainer's log.

A PE model's training forward with ``labels`` adds its parts (SeqPE: ``loss_delta``, ``loss_ood``,
``loss_reg``, ``pe_spread``, ...) here, detached and without reading them on the host; a trainer's
logging step takes their mean since its last log (:func:`pop_pe_logs`, used by
:class:`seqpe_nd.tasks.backbones.huggingface.PELogCallback`).
"""

from typing import Any

from torch import Tensor, nn

_SUMS = "_seqpe_nd_pe_log_sums"


def add_pe_logs(model: nn.Module, logs: dict[str, Any] | None) -> None:
    """Add one forward's parts to ``model``'s running sums (device tensors stay on the device)."""
    if not logs:
        return
    sums: dict[str, Any] = model.__dict__.setdefault(_SUMS, {"_forwards": 0})
    sums["_forwards"] += 1
    for key, value in logs.items():
        if isinstance(value, (Tensor, int, float)) and not isinstance(value, bool):
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            sums[key] = sums.get(key, 0.0) + value


def pop_pe_logs(model: nn.Module) -> dict[str, float]:
    """The mean of each part over the forwards since the last call, ``pe/<part>``; empty when none ran."""
    sums = model.__dict__.pop(_SUMS, None)
    if not sums or not sums["_forwards"]:
        return {}
    n = sums.pop("_forwards")
    return {f"pe/{k}": float(v) / n for k, v in sums.items()}

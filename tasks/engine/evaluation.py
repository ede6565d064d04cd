"""Pieces every recipe's ``evaluate`` shares: option checks, the classification loop, the result file.

Legend: ``b`` batch, ``k`` classes.
"""

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from seqpe_nd.tasks.engine import checkpoint as ckpt

EVAL_JSON = "eval.json"


def reject_unknown_options(recipe: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """``evaluate(**options)`` receives every CLI flag; one this recipe has no use for is an error, unless unset."""
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"the {recipe} recipe's evaluate() has no option(s) {given}; allowed: {', '.join(allowed)}")


@torch.no_grad()
def classify(
    forward: Callable[[Any], Float[Tensor, "b k"]], batches: Iterable[tuple[Any, Int[Tensor, " b"]]], *, unit: str
) -> dict[str, float]:
    """Top-1 (%) and mean cross-entropy over ``(inputs, targets)`` batches already on the device.

    ``seconds`` covers everything (data included); ``{unit}_per_s`` times the forward alone.
    """
    correct, loss, seen, compute = 0, 0.0, 0, 0.0
    t0 = time.perf_counter()
    for inputs, y in batches:
        t = time.perf_counter()
        logits = forward(inputs).float()
        compute += time.perf_counter() - t
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        seen += len(y)
    if seen == 0:
        raise ValueError(f"no {unit} to evaluate; raise the number of evaluation {unit}")
    return {
        "top1": 100.0 * correct / seen,
        "loss": loss / seen,
        unit: seen,
        "seconds": time.perf_counter() - t0,
        f"{unit}_per_s": seen / max(compute, 1e-9),
    }


def write_result(run_dir: Path, result: Mapping[str, Any]) -> Path:
    """``run_dir/eval.json``, written atomically so a crash never leaves half a result."""
    path = Path(run_dir) / EVAL_JSON
    ckpt.atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path

"""What every recipe's evaluation shares: the device, a trained run's config and weights, the
classification loop, tables, and the result file.

Legend: ``b`` batch, ``k`` classes.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from seqpe_nd.tasks.engine import checkpoint as ckpt

EVAL_JSON = "eval.json"
RUN_CONFIG = "config.json"


def reject_unknown_options(recipe: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """``evaluate(**options)`` receives every CLI flag; one this recipe has no use for is an error, unless unset."""
    given = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if given:
        raise ValueError(f"the {recipe} recipe's evaluate() has no option(s) {given}; allowed: {', '.join(allowed)}")


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a training run saved (``run_dir/config.json``)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_CONFIG}; is it a training run directory?")
    return ckpt.read_json(path)


def load_weights_checked(
    model: nn.Module, found: Path, expected: Mapping[str, Any], sections: Sequence[str],
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> nn.Module:
    """``model`` with the weights of checkpoint ``found``, in eval mode.

    A checkpoint whose ``sections`` differ from ``expected`` (the config ``model`` was built from)
    raises a ValueError naming each differing field before any weight is read.
    """
    ckpt.verify_checkpoint(found)  # a torn file is named before anything is built or loaded
    saved = ckpt.read_json(Path(found) / RUN_CONFIG)
    if normalize is not None:
        saved = normalize(saved)
    ckpt.check_config(expected, {k: v for k, v in saved.items() if k != "train"}, tuple(sections))
    ckpt.load_weights(model, found)
    return model.eval()


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


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The saved ``run_dir/eval.json``; None when there is none or it is torn (it is then written anew)."""
    path = Path(run_dir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        saved = ckpt.read_json(path)
    except ckpt.CorruptFile:
        return None
    return saved if isinstance(saved, dict) else None


def _size_order(key: str) -> tuple[int, ...] | tuple[float]:
    """``"2048"`` < ``"4096"``, ``"8x32"`` < ``"8x64"``; a key that is not numbers sorts last."""
    try:
        return tuple(int(p) for p in key.split("x"))
    except ValueError:
        return (float("inf"),)


def merge_results(
    previous: Mapping[str, Any] | None, result: Mapping[str, Any], *, rows_key: str, same: Sequence[str]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """``result`` plus the rows of ``previous`` it did not re-measure, when both measured alike.

    ``same`` names the fields (checkpoint, split, PE, ...) that must agree for rows to sit in one file.
    Returns (merged, the sizes kept from ``previous``, the fields that differed: then ``previous`` is
    replaced, not merged).
    """
    if previous is None or not isinstance(previous.get(rows_key), dict):
        return dict(result), [], []
    differ = [k for k in same if previous.get(k) != result.get(k)]
    if differ:
        return dict(result), [], differ
    rows = dict(result[rows_key])
    kept = [k for k in previous[rows_key] if k not in rows]
    rows.update({k: previous[rows_key][k] for k in kept})
    return {**result, rows_key: dict(sorted(rows.items(), key=lambda kv: _size_order(kv[0])))}, kept, []


def files_changed(folder: Path, before: Mapping[str, tuple[int, int, int]]) -> list[Path]:
    """Files directly in ``folder`` written since ``before`` (from :func:`file_times`), by name."""
    now = file_times(folder)
    return [Path(folder) / name for name, t in sorted(now.items()) if before.get(name) != t]


def file_times(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, modification time, size) of the files directly in ``folder``, to tell after what was written
    (an atomic write is a new inode even within the clock's resolution)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: (st.st_ino, st.st_mtime_ns, st.st_size) for p in folder.iterdir() if p.is_file() and (st := p.stat())}


def fmt(x: float | None, digits: int = 2) -> str:
    """A table cell: ``-`` for a missing value, 3 significant digits from 10 000 up."""
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 else f"{x:.{digits}f}"


def fmt_spread(mean: float | None, std: float | None, digits: int = 2) -> str:
    """A ``mean ± std`` cell; the mean alone when there is no spread (one seed)."""
    return fmt(mean, digits) if std is None or mean is None else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1) of ``values``; the std is None for a single value."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Print a rich table (first column left-aligned, numbers right) and return it as Markdown."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for cells in rows:
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # logs: wide enough for every column
    return "\n".join(md) + "\n"


def relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (``checkpoints/step_000004``), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def written_note(run_dir: Path, written: Sequence[Path], kept: Sequence[str], differ: Sequence[str]) -> str:
    """``wrote RUN/eval.json, RUN/eval.png`` and what became of an earlier ``eval.json``."""
    note = "wrote " + ", ".join(str(p) for p in written)
    if kept:
        note += f" ({EVAL_JSON} also keeps size(s) {', '.join(kept)} measured before)"
    if differ:
        note += f" (the earlier {EVAL_JSON} was replaced: its {', '.join(differ)} differed)"
    return note

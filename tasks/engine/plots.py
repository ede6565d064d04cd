"""The figures runs and comparisons write (matplotlib, Agg backend), each saved atomically like every other output."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default) via a temporary file, and close it."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_ppl(
    curves: Mapping[str, Mapping[int, float]],
    path: Path,
    *,
    title: str,
    train_length: int | None = None,
    std: Mapping[str, Mapping[int, float | None]] | None = None,
) -> Path:
    """Perplexity (log scale) against evaluation length (log2 scale), one line per run.

    ``std`` (a run's spread at each length, e.g. the sample std over seeds of a mean ``curves``) draws error bars;
    a run or length missing from it, or None, gets none.
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        xs = sorted(points)
        ax.errorbar(xs, [points[x] for x in xs], yerr=_error_bars(std, name, xs), marker="o", capsize=3, label=name)
    if train_length is not None:
        ax.axvline(train_length, color="grey", linestyle=":", linewidth=1, label=f"train length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 128, 2048 and 110, not 2^7 and 1.1x10^2
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _error_bars(
    std: Mapping[str, Mapping[Any, float | None]] | None, name: str, xs: Sequence[Any]
) -> list[float] | None:
    """The half-heights of ``name``'s error bars at ``xs`` (0 where a value is missing); None without any."""
    spread = (std or {}).get(name)
    if not spread or all(spread.get(x) is None for x in xs):
        return None
    return [spread.get(x) or 0.0 for x in xs]


def plot_accuracy(
    results: dict[str, dict[str, Any]],
    path: Path,
    *,
    title: str | None = None,
    std: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Path:
    """Top-1 against evaluation resolution, one line per run, training resolution marked.

    ``std`` (a run's spread at each resolution, keyed like ``results[run]["resolutions"]``, e.g. the sample std over
    seeds of a mean top-1) draws error bars.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    trains = set()
    for name, res in results.items():
        xs = sorted(int(s) for s in res["resolutions"])
        yerr = _error_bars(std, name, [str(x) for x in xs])
        ax.errorbar(xs, [res["resolutions"][str(x)]["top1"] for x in xs], yerr=yerr, marker="o", capsize=3, label=name)
        trains.add(res["train_resolution"])
    for r in trains:
        ax.axvline(r, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation resolution (px, same patch size)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "top-1 vs resolution", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_similarity(sim: Tensor, grid: Sequence[int], path: Path, *, title: str) -> Path:
    """Fig. 3: five rows of dot products (corners, centre) with every position of a 2-D ``grid``, as images."""
    names = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.3), dpi=110)
    for ax, row, name in zip(axes, sim, names):
        im = ax.imshow(row.reshape(*grid).cpu().numpy(), cmap="viridis")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_qa(
    runs: dict[str, dict[str, dict[str, Any]]], path: Path, *, title: str, train_length: int | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """EM (solid) and strict EM (dashed) and answer perplexity (log) against context length, one colour per run.

    A row may carry ``em_std``/``ppl_std`` (spread over seeds, drawn as error bars); ``baselines`` are
    reference EM levels per length (chance, copying a random document's answer), drawn in grey.
    """
    path = Path(path)
    fig, (ax_em, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for i, (name, rows) in enumerate(runs.items()):
        xs = sorted(int(k) for k in rows)
        colour = f"C{i}"
        cells = [rows[str(x)] for x in xs]
        ax_em.errorbar(xs, [c["em"] for c in cells], yerr=[c.get("em_std", 0.0) for c in cells], marker="o",
                       color=colour, label=name, capsize=3)
        ax_em.plot(xs, [c["strict_em"] for c in cells], marker="x", linestyle="--", color=colour)
        ax_ppl.errorbar(xs, [c["ppl"] for c in cells], yerr=[c.get("ppl_std", 0.0) for c in cells], marker="o",
                        color=colour, label=name, capsize=3)
    for j, (name, levels) in enumerate((baselines or {}).items()):
        xs = sorted(int(k) for k in levels)
        ax_em.plot(xs, [levels[str(x)] for x in xs], color="grey", linestyle=(":", "-.", "--")[j % 3], label=name)
    lengths = sorted({int(k) for rows in runs.values() for k in rows})
    top = max([rows[k]["em"] + rows[k].get("em_std", 0.0) for rows in runs.values() for k in rows] + [0.0])
    top = max([top, *(v for levels in (baselines or {}).values() for v in levels.values())])
    ax_em.set_ylim(-2, max(10.0, 1.15 * top))
    for ax in (ax_em, ax_ppl):
        if train_length is not None:
            ax.axvline(train_length, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="major", alpha=0.3)
    ax_em.set_ylabel("EM % (solid: contains, dashed: strict)")
    ax_ppl.set_ylabel("answer perplexity")
    ax_ppl.set_yscale("log")
    ax_em.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metric(
    curves: Mapping[str, Mapping[str, float]], path: Path, *, title: str, xlabel: str, ylabel: str
) -> Path:
    """One line per run of a metric against named evaluation sizes (``"8x32"``, ...), in the order first seen."""
    labels = list(dict.fromkeys(k for points in curves.values() for k in points))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        xs = [i for i, label in enumerate(labels) if label in points]
        ax.plot(xs, [points[labels[i]] for i in xs], marker="o", label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)

"""``seqpe-nd space show CONFIG``: example positions, their digit tokens and pairwise distances."""

import argparse

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seqpe_nd.positions import GridSpace, HybridSpace, load_space


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    space = sub.add_parser("space", help="inspect a position space").add_subparsers(dest="action", required=True)
    show = space.add_parser("show", help="print example positions, digit tokens and distances")
    show.add_argument("config", help="YAML file describing a position space")
    show.add_argument("--num", type=int, default=6, help="example positions to show (default 6)")
    show.add_argument("--segments", default=None, help="hybrid only: layout such as 'text:3,image:2x2,text:2'")
    show.set_defaults(func=run_show)


def example_positions(space: GridSpace | HybridSpace, num: int, segments: str | None = None) -> torch.Tensor:
    """Corners and the far end of the training grid (grid), or a small interleaved layout (hybrid)."""
    if isinstance(space, HybridSpace):
        if segments is None:
            segments = ", ".join(
                f"{m.name}:{2 if m.space.ndim == 1 else 'x'.join(['2'] * m.space.ndim)}" for m in space.modalities
            )
        return space.layout(segments).positions[:num]
    extent = torch.tensor(space.L)
    picks = [torch.zeros_like(extent), torch.ones_like(extent), extent - 1, extent, torch.tensor(space.L_max) - 1]
    picks += [extent // 2 + i for i in range(max(0, num - len(picks)))]
    return torch.stack(picks[:num])


def _fmt_tokens(space: GridSpace | HybridSpace, tokens: torch.Tensor) -> str:
    names = {space.cls_token: "[CLS]"}
    if isinstance(space, HybridSpace):
        names[space.pad_token] = "[PAD]"
        names.update({space.modality_token(i): f"[{m.name}]" for i, m in enumerate(space.modalities)})
    return " ".join(names.get(int(t), format(int(t), "x" if space.base <= 16 else "d")) for t in tokens)


def run_show(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise ValueError(f"--num {args.num} is not allowed; it must be a positive integer")
    space = load_space(args.config)
    if args.segments is not None and not isinstance(space, HybridSpace):
        raise ValueError(f"--segments is for hybrid spaces; {args.config} is a {space.ndim}-D grid space")
    console = Console()
    pos = example_positions(space, args.num, args.segments)
    tokens = space.tokenize(pos)
    summary = f"[bold]{args.config}[/]: kind={space.kind}, width={space.width}, base={space.base}, tokens/position={space.seq_len}"
    if isinstance(space, GridSpace):
        summary += f", L={list(space.L)}, L_max={list(space.L_max)}, k={space.k}, distance={space.distance}"
    else:
        summary += f", modalities={[m.name for m in space.modalities]}, timeline={space.timeline}, gap={space.gap}"
    console.print(summary)
    console.print(f"place ids (O) per token slot: {space.place_ids.tolist()}   dim ids (D): {space.dim_ids.tolist()}   (-1: none)")

    table = Table(title="positions and their digit tokens")
    table.add_column("#", justify="right")
    table.add_column("position")
    table.add_column("tokens")
    for i, (p, t) in enumerate(zip(pos, tokens)):
        table.add_row(str(i), str(p.tolist()), escape(_fmt_tokens(space, t)))
    console.print(table)

    dist = space.delta(pos[:, None], pos[None])
    dtable = Table(title="pairwise distances δ")
    dtable.add_column("")
    for i in range(len(pos)):
        dtable.add_column(str(i), justify="right")
    for i in range(len(pos)):
        dtable.add_row(str(i), *(f"{float(d):.3g}" for d in dist[i]))
    console.print(dtable)
    return 0

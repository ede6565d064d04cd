"""``seqpe-nd plot similarity``: the paper's Fig. 2 (1-D) and Fig. 3 (2-D) dot-product maps of SeqPE.

Legend: ``m`` positions, ``d`` model dim.

Fig. 2 is the dot product ``e_i · e_j`` of 1-D positions ``0 … N-1``; Fig. 3 the dot product of
five chosen positions of a 2-D grid (four corners and the centre) with every position of it.
The encoder is freshly built from a space YAML (optionally trained alone with L_δ for
``--train-steps`` steps, to see the regularizer's effect), loaded with ``--encoder`` from a
folder written by :func:`seqpe_nd.encoder.save_encoder`, or taken with ``--run`` from a trained
run's checkpoint (the latest, or the one ``--checkpoint`` names): the encoder the run trained.
"""

import argparse
from pathlib import Path

import torch
from jaxtyping import Float

from seqpe_nd.encoder import SeqPE, load_encoder, save_encoder
from seqpe_nd.encodings import load_pe_config
from seqpe_nd.positions import GridSpace, load_space
from seqpe_nd.regularizers import SeqPERegularizer, train_regularizers_alone
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import read_run_config

ENCODER_KWARGS = ("hidden", "layers", "heads", "mlp_ratio", "dropout", "causal", "init", "qk_norm")
"""Fields of a SeqPE config that are the encoder's constructor arguments (besides the space and d_model)."""


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    plot = sub.add_parser("plot", help="figures of a SeqPE encoder").add_subparsers(dest="action", required=True)
    sim = plot.add_parser("similarity", help="Fig. 2 (1-D) / Fig. 3 (2-D): dot products between position embeddings")
    src = sim.add_mutually_exclusive_group(required=True)
    src.add_argument("--space", help="position-space YAML: build a fresh encoder for it")
    src.add_argument("--encoder", help="folder written by save_encoder (encoder.safetensors + encoder.json)")
    src.add_argument("--run", help="training run directory of a SeqPE run: its trained encoder (latest checkpoint)")
    sim.add_argument("--checkpoint", default=None, help="with --run: this checkpoint folder instead of the latest")
    sim.add_argument("--out", default="runs/plots", help="folder for the PNGs (default runs/plots)")
    sim.add_argument("--num", type=int, default=None, help="1-D: plot positions 0..NUM-1 (default min(L_max, 2048))")
    sim.add_argument("--extent", default=None, help="2-D: grid extent HxW (default the space's training extent L)")
    sim.add_argument("--d-model", type=int, default=128, help="fresh encoder: output width (default 128)")
    sim.add_argument("--hidden", type=int, default=128, help="fresh encoder: width (default 128)")
    sim.add_argument("--layers", type=int, default=2, help="fresh encoder: layers (default 2)")
    sim.add_argument("--seed", type=int, default=0, help="seed for initialisation and sampling (default 0)")
    sim.add_argument("--train-steps", type=int, default=0, help="train the encoder alone with L_δ first (default 0)")
    sim.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate for --train-steps (default 2e-3)")
    sim.add_argument("--save", default=None, help="also save the (trained) encoder to this folder")
    sim.set_defaults(func=run_similarity)


def encoder_of_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[SeqPE, Path]:
    """The SeqPE encoder a training run trained, with the weights of its latest checkpoint (or ``checkpoint``)."""
    saved = read_run_config(Path(run_dir))
    pe = load_pe_config(saved.get("pe") or {})
    if pe.method != "seqpe":
        raise ValueError(f"{run_dir} trained pe.method {pe.method!r}; plot similarity draws SeqPE encoders (method: seqpe)")
    found = ckpt.resolve_checkpoint(Path(checkpoint) if checkpoint is not None else Path(run_dir))
    ckpt.verify_checkpoint(found)
    tensors = ckpt.read_tensors(found / "model.safetensors")
    heads = [k for k in tensors if k.endswith("encoder.proj.weight")]
    if len(heads) != 1:
        raise ValueError(f"checkpoint {found} holds {len(heads)} SeqPE encoders (tensors '*encoder.proj.weight'); expected one")
    prefix = heads[0].removesuffix("proj.weight")
    encoder = SeqPE(load_space(saved["space"]), tensors[heads[0]].shape[0], **{k: getattr(pe, k) for k in ENCODER_KWARGS})
    encoder.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return encoder.eval(), found


def train_l_delta(encoder: SeqPE, steps: int, *, lr: float, seed: int) -> list[float]:
    """Train the encoder alone with L_δ (α = 1, β = 0) for ``steps`` Adam steps; returns the losses."""
    reg = SeqPERegularizer(encoder.space, alpha=1.0, beta=0.0, ood_heads=1)
    gen = torch.Generator().manual_seed(seed)
    losses = train_regularizers_alone(encoder, reg, steps, lr=lr, generator=gen, decay=True)
    return [float(x) for x in losses]


def similarity_1d(encoder: SeqPE, num: int) -> Float[torch.Tensor, "m m"]:
    """Fig. 2: ``e_i · e_j`` for positions 0 … num-1."""
    e = encoder.export_table(num)
    return e @ e.T


def similarity_2d(encoder: SeqPE, extent: tuple[int, int]) -> tuple[list[tuple[int, int]], Float[torch.Tensor, "5 m"]]:
    """Fig. 3: the four corners and the centre, each dotted with every position of the grid."""
    h, w = extent
    picks = [(0, 0), (0, w - 1), (h // 2, w // 2), (h - 1, 0), (h - 1, w - 1)]
    e = encoder.export_table(extent)  # (h*w, d), row-major
    rows = torch.tensor([i * w + j for i, j in picks])
    return picks, e[rows] @ e.T


def run_similarity(args: argparse.Namespace) -> int:
    from seqpe_nd.tasks.engine.plots import plt, save_figure  # matplotlib only when a figure is drawn

    if args.checkpoint is not None and args.run is None:
        raise ValueError("--checkpoint picks a checkpoint of --run RUN_DIR; pass --run too")
    if args.run is not None:
        encoder, found = encoder_of_run(args.run, args.checkpoint)
        print(f"loaded the SeqPE encoder of {found}")
    elif args.encoder is not None:
        encoder = load_encoder(args.encoder)
    else:
        torch.manual_seed(args.seed)
        encoder = SeqPE(load_space(args.space), args.d_model, hidden=args.hidden, layers=args.layers)
    space = encoder.space
    if not isinstance(space, GridSpace) or space.ndim > 2:
        raise ValueError(f"plot similarity draws 1-D (Fig. 2) and 2-D (Fig. 3) grid spaces; this space is {_describe(space)}")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps = {args.train_steps} is not allowed; it must be >= 0")
    if args.train_steps:
        losses = train_l_delta(encoder, args.train_steps, lr=args.lr, seed=args.seed)
        print(f"trained {args.train_steps} steps on L_δ: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.save:
        print(f"saved encoder to {save_encoder(encoder, args.save)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = "trained with L_δ" if args.train_steps else ("checkpoint" if args.encoder or args.run else "untrained")

    if space.ndim == 1:
        num = args.num if args.num is not None else min(space.L_max[0], 2048)
        if not 2 <= num <= space.L_max[0]:
            raise ValueError(f"--num = {num} is not allowed; it must be in [2, L_max = {space.L_max[0]}]")
        sim = similarity_1d(encoder, num)
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(sim.numpy(), cmap="viridis", origin="upper")
        ax.set(title=f"SeqPE e_i · e_j, positions 0..{num - 1} ({title})", xlabel="position j", ylabel="position i")
        fig.colorbar(im, ax=ax)
        path = out / "similarity-1d.png"
    else:
        extent = _parse_extent(args.extent) if args.extent else (space.L[0], space.L[1])
        for i, (e, lm) in enumerate(zip(extent, space.L_max)):
            if not 1 <= e <= lm:
                raise ValueError(f"--extent dim {i} = {e} is not allowed; it must be in [1, L_max = {lm}]")
        picks, sim = similarity_2d(encoder, extent)
        fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
        for ax, (i, j), row in zip(axes, picks, sim):
            im = ax.imshow(row.view(*extent).numpy(), cmap="viridis")
            ax.plot(j, i, "r+", markersize=10)
            ax.set(title=f"({i}, {j})", xticks=[], yticks=[])
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"SeqPE: dot product of five positions with the {extent[0]}x{extent[1]} grid ({title})")
        path = out / "similarity-2d.png"
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")
    return 0


def _parse_extent(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--extent {text!r} is not HxW, e.g. 14x14")
    return int(parts[0]), int(parts[1])


def _describe(space: object) -> str:
    return f"{space.ndim}-D" if isinstance(space, GridSpace) else "hybrid"

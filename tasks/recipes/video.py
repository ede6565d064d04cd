"""The video recipe (``task: video``): the ViT adapter over a 3-D space of tubelet patches.

Beyond the paper (which shows 1-D and 2-D): the same timm VisionTransformer and
:class:`~seqpe_nd.tasks.recipes.vit.ViTWithPE` as the image recipe, with timm's ``embed_layer`` seam
filled by :class:`~seqpe_nd.tasks.recipes.vit.TubeletEmbed`. The position space is a 3-D grid
``(frame, row, col)`` declared in YAML, and every method (NoPE, APE-sin 3-D, APE-learn with
trilinear resampling, axial RoPE 3-D, SeqPE 3-D, ...) comes from the PE config alone: nothing
here knows which one it holds. Clips come from :mod:`seqpe_nd.tasks.data.video`; the model is
trained at ``T`` frames × ``R`` pixels and evaluated at more frames and at larger frames.

Legend: b batch, c channels, f frames, y/x pixels.
"""

import json
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, SeqPEConfig, build_position_encoding, pe_metrics
from seqpe_nd.positions import GridSpace, HybridSpace, load_space
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON as EVAL_JSON, classify, reject_unknown_options, write_result
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.trainer import TrainConfig, unwrap
from seqpe_nd.tasks.data.video import CLASSES, VideoDataConfig, clip_batch
from seqpe_nd.tasks.recipes.vit import TubeletEmbed, ViTWithPE, create_vit, load_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STRICT_SECTIONS: tuple[str, ...] = ("task", "model", "space", "pe")
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class VideoModelSettings(_Section):
    """The video ViT (``model:``): a timm VisionTransformer with a tubelet patch embedding."""

    img_size: PositiveInt = 32
    """Training frame size R in pixels (square)."""
    frames: PositiveInt = 4
    """Training clip length T in frames."""
    patch_size: PositiveInt = 8
    """Spatial patch size."""
    tubelet: PositiveInt = 1
    """Frames per tubelet (1: each token sees one frame, so motion is only visible through positions)."""
    embed_dim: PositiveInt = 96
    """Width."""
    depth: PositiveInt = 3
    """Blocks."""
    num_heads: PositiveInt = 4
    """Attention heads."""
    mlp_ratio: float = Field(2.0, gt=0)
    """MLP width ratio."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth."""

    @model_validator(mode="after")
    def _check(self) -> "VideoModelSettings":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim = {self.embed_dim} must be divisible by num_heads = {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size = {self.img_size} must be a multiple of patch_size = {self.patch_size}")
        if self.frames % self.tubelet:
            raise ValueError(f"frames = {self.frames} must be a multiple of tubelet = {self.tubelet}")
        return self

    @property
    def grid(self) -> tuple[int, int, int]:
        """The training token grid (frames / tubelet, R / patch, R / patch)."""
        g = self.img_size // self.patch_size
        return (self.frames // self.tubelet, g, g)


class VideoEvalSettings(_Section):
    """Evaluation (``eval:``) and validation during training."""

    sizes: list[tuple[PositiveInt, PositiveInt]] | None = None
    """(frames, pixels) pairs for ``seqpe-nd eval``; default (T, R), (2T, R), (3T, R), (T, 1.5R), (T, 2R), (2T, 2R)."""
    max_clips: PositiveInt | None = None
    """Evaluate only the first this many validation clips (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Clips per evaluation forward."""
    val_clips: PositiveInt = 256
    """Validation during training: the first this many clips at the training size."""


class VideoConfig(_Section):
    """A whole video run: one YAML file with ``task: video``."""

    task: Literal["video"] = "video"
    model: VideoModelSettings = VideoModelSettings()
    data: VideoDataConfig = VideoDataConfig()
    space: dict[str, Any] | str
    """3-D position space (frame, row, col): an inline mapping or a YAML path; its L must be the training token grid."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(
            integration="attn_mul", per_layer=True, hidden=64, heads=2, init="trunc_normal"
        )
    )
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope_axial, rope_mixed, seqpe, ...)."""
    random_shift: bool = False
    """Shift a whole step's token positions with the space's ``shift.prob`` (App. A.5; SeqPE runs)."""
    train: TrainConfig = TrainConfig()
    eval: VideoEvalSettings = VideoEvalSettings()


def load_space_source(source: dict[str, Any] | str) -> GridSpace | HybridSpace:
    """A position space from a config's ``space:``: an inline mapping or a YAML path (cwd or the repository)."""
    if isinstance(source, dict):
        return load_space(source)
    p = Path(source)
    found = next((c for c in (p, Path.cwd() / p, REPO_ROOT / p) if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"space file {source!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")
    return load_space(found)


def validate_config(model: type[ConfigT], config: dict[str, Any] | ConfigT) -> ConfigT:
    """A run config validated by ``model``; errors name the dotted field path."""
    if isinstance(config, model):
        return config
    try:
        return model.model_validate(config)
    except ValidationError as err:
        from seqpe_nd.tasks.recipes import format_validation_error

        raise ValueError(format_validation_error(err)) from None


def load_trained(run_dir: Path, task: Any, strict_sections: tuple[str, ...]) -> nn.Module:
    """``task.build_model()`` with a run's latest weights, in eval mode; a checkpoint whose
    model/space/PE differs from ``task.config_dict()`` says which field."""
    found = ckpt.latest_checkpoint(Path(run_dir))
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}")
    saved = json.loads((found / "config.json").read_text())
    ckpt.check_config(task.config_dict(), {k: v for k, v in saved.items() if k != "train"}, strict_sections)
    model = task.build_model()
    ckpt.load_weights(model, found)
    return model.eval()


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )


def resolve_space(source: dict[str, Any] | str) -> GridSpace:
    """The 3-D grid space of a config's ``space:``."""
    space = load_space_source(source)
    if not isinstance(space, GridSpace) or space.ndim != 3:
        raise ValueError(
            f"space: the video recipe needs a 3-D grid space (frame, row, col), got {space.kind} of width {space.width}"
        )
    return space


def parse_config(config: dict[str, Any] | VideoConfig) -> VideoConfig:
    """Validate a run config; errors name the dotted field path."""
    return validate_config(VideoConfig, config)


def build_model(cfg: VideoConfig, space: GridSpace) -> ViTWithPE:
    """A randomly initialised video ViT: timm's VisionTransformer, a tubelet embedding, ``cfg.pe``."""
    m = cfg.model
    vit = create_vit(
        None,
        img_size=m.img_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_classes=len(CLASSES),
        drop_path_rate=m.drop_path_rate,
        embed_layer=partial(TubeletEmbed, num_frames=m.frames, tubelet=m.tubelet),
    )
    attn = vit.blocks[0].attn
    pe = build_position_encoding(
        cfg.pe,
        space=space,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        num_layers=len(vit.blocks),
        d_model=vit.embed_dim,
    )
    return ViTWithPE(vit, pe)


@torch.no_grad()
def accuracy(
    model: nn.Module, cfg: VideoConfig, frames: int, size: int, count: int, *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 and loss of the first ``count`` validation clips rendered at ``frames × size``."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(0, count, batch_size):
            x, y = clip_batch(cfg.data, cfg.train.seed, "validation", range(s, min(count, s + batch_size)), frames, size)
            yield x.to(device), y.to(device)

    return classify(lambda x: model(x).logits, batches(), unit="clips")


class VideoTask:
    """TrainTask of the video recipe (see :class:`seqpe_nd.tasks.engine.trainer.TrainTask`)."""

    def __init__(self, cfg: VideoConfig, run_dir: Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.space = resolve_space(cfg.space)
        if tuple(self.space.L) != cfg.model.grid:
            m = cfg.model
            raise ValueError(
                f"space.L = {list(self.space.L)} must be the training token grid {list(m.grid)} "
                f"(model.frames = {m.frames} / tubelet = {m.tubelet}, model.img_size = {m.img_size} / patch_size = {m.patch_size})"
            )

    # -- TrainTask ------------------------------------------------------------------------
    def build_model(self) -> ViTWithPE:
        return build_model(self.cfg, self.space)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t, m = self.cfg.train, self.cfg.model
        first = ((step * t.grad_accum + micro) * world + rank) * t.batch_size
        x, y = clip_batch(self.cfg.data, t.seed, "train", range(first, first + t.batch_size), m.frames, m.img_size)
        return {"clips": x, "targets": y}

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        clips, targets = batch["clips"], batch["targets"]
        offset, shifted = None, False
        if self.cfg.random_shift:
            grid = unwrap(model).grid_shape(clips.shape)
            shift = self.space.sample_shift(generator, extent=list(grid))
            if shift.applied:  # the whole step's grids start at z (App. A.5)
                offset, shifted = shift.z.to(clips.device), True
        out = model(clips, pos_offset=offset, pe_generator=generator, pe_shifted=shifted)
        main = F.cross_entropy(out.logits.float(), targets)
        metrics: dict[str, float | Tensor] = {
            "cls_loss": float(main.detach()),
            "shifted": float(shifted),
            "train_top1": 100.0 * float((out.logits.argmax(-1) == targets).float().mean()),
        }
        total = main
        if out.aux_loss is not None:
            total = total + out.aux_loss
        metrics.update(pe_metrics(out.aux_loss, out.logs))
        return total, metrics

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 on the first ``eval.val_clips`` validation clips at the training size."""
        device = next(unwrap(model).parameters()).device
        m, e = self.cfg.model, self.cfg.eval
        res = accuracy(
            model,
            self.cfg,
            m.frames,
            m.img_size,
            min(e.val_clips, self.cfg.data.val_size),
            batch_size=e.batch_size,
            device=device,
        )
        return {"top1": res["top1"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["clips"].shape[0])  # clips, for clips/s

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        # As the image recipe: biases, norms, cls/prefix embeddings and every PE parameter.
        return param.ndim < 2 or name.startswith("pe.") or name in ("prefix_pos", "vit.cls_token", "vit.reg_token")

    def config_dict(self) -> dict[str, Any]:
        out = self.cfg.model_dump(mode="json", exclude={"train"})
        out["space"] = self.space.model_dump(mode="json")
        return out


def build_task(config: dict[str, Any], run_dir: Path) -> VideoTask:
    """The recipe entry point (``task: video``)."""
    return VideoTask(parse_config(config), run_dir)


# =====================================================================================================
# Evaluation: accuracy at more frames and at larger frames
# =====================================================================================================


def default_sizes(frames: int, img_size: int, patch_size: int, tubelet: int) -> list[tuple[int, int]]:
    """(T, R), (2T, R), (3T, R), (T, 1.5R), (T, 2R), (2T, 2R), sizes rounded to whole patches."""

    def px(f: float) -> int:
        return max(patch_size, round(img_size * f / patch_size) * patch_size)

    return [
        (frames, img_size),
        (2 * frames, img_size),
        (3 * frames, img_size),
        (frames, px(1.5)),
        (frames, px(2)),
        (2 * frames, px(2)),
    ]


def load_model(run_dir: Path, *, task: VideoTask | None = None) -> ViTWithPE:
    """The trained model of a run in eval mode; a checkpoint whose model/space/PE differs says which field."""
    task = task or VideoTask(parse_config(load_run_config(run_dir)), run_dir)
    return load_trained(run_dir, task, STRICT_SECTIONS)  # type: ignore[return-value]


def evaluate(
    run_dir: Path,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    max_clips: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    write: bool = True,
    quiet: bool = False,
    **unused: Any,
) -> dict[str, Any]:
    """Top-1 of a trained run at each (frames, pixels) size; writes ``eval.json`` atomically.

    Args:
        sizes: (frames, pixels) pairs; default the config's ``eval.sizes`` or :func:`default_sizes`.
    """
    reject_unknown_options("video", unused, ("sizes", "max_clips", "batch_size", "device"))
    run_dir = Path(run_dir)
    cfg = parse_config(load_run_config(run_dir))
    task = VideoTask(cfg, run_dir)
    m = cfg.model
    pairs = [
        tuple(int(v) for v in s)
        for s in (sizes or cfg.eval.sizes or default_sizes(m.frames, m.img_size, m.patch_size, m.tubelet))
    ]
    for s in pairs:
        if len(s) != 2 or s[0] < m.tubelet or s[1] < m.patch_size:
            raise ValueError(
                f"eval size {list(s)} must be (frames >= tubelet = {m.tubelet}, pixels >= patch_size = {m.patch_size})"
            )
    dev = pick_device(device)
    model = load_model(run_dir, task=task).to(dev)
    n = min(cfg.data.val_size, max_clips or cfg.eval.max_clips or cfg.data.val_size)
    bs = batch_size or cfg.eval.batch_size
    t0 = time.perf_counter()
    rows = {}
    for f, s in pairs:
        r = accuracy(model, cfg, f, s, n, batch_size=bs, device=dev)
        rows[f"{f}x{s}"] = {
            **r,
            "frames": f,
            "pixels": s,
            "grid": [f // m.tubelet, s // m.patch_size, s // m.patch_size],
        }
    result = {
        "run_dir": str(run_dir),
        "train_size": [m.frames, m.img_size],
        "pe": cfg.pe.model_dump(mode="json"),
        "device": str(dev),
        "seconds": time.perf_counter() - t0,
        "sizes": rows,
    }
    if write:
        write_result(run_dir, result)
    if not quiet:
        print_eval(result)
    return result


def print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    T, R = result["train_size"]
    table = Table(title=f"{result['run_dir']} — top-1 vs clip size (trained at {T} frames × {R} px)")
    for col in ("frames", "pixels", "token grid", "clips", "top-1 %", "loss", "seconds"):
        table.add_column(col, justify="right")
    for r in result["sizes"].values():
        table.add_row(
            str(r["frames"]),
            str(r["pixels"]),
            "×".join(map(str, r["grid"])),
            str(r["clips"]),
            f"{r['top1']:.2f}",
            f"{r['loss']:.3f}",
            f"{r['seconds']:.1f}",
        )
    Console().print(table)

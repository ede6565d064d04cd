"""The video recipe (``task: video``): the ViT adapter over a 3-D space of tubelet patches.

Beyond the paper (which shows 1-D and 2-D): the same timm VisionTransformer and
:class:`~seqpe_nd.tasks.backbones.vit.ViTWithPE` as the image recipe, with timm's ``embed_layer`` seam
filled by :class:`~seqpe_nd.tasks.backbones.vit.TubeletEmbed`. The position space is a 3-D grid
``(frame, row, col)`` declared in YAML, and every method (NoPE, APE-sin 3-D, APE-learn with
trilinear resampling, axial RoPE 3-D, SeqPE 3-D, ...) comes from the PE config alone: nothing
here knows which one it holds. Clips come from :mod:`seqpe_nd.tasks.data.video`; the model is
trained at ``T`` frames × ``R`` pixels and evaluated at more frames and at larger frames.

Legend: b batch, c channels, f frames, y/x pixels.
"""

from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, PEDraws, SeqPEConfig
from seqpe_nd.tasks.backbones.vit import TubeletEmbed, ViTWithPE, create_vit
from seqpe_nd.tasks.data.video import CLASSES, VideoDataConfig, clip_batch
from seqpe_nd.tasks.engine.evaluation import classify
from seqpe_nd.tasks.engine.trainer import unwrap
from seqpe_nd.tasks.recipes.base import EvalPlan, Recipe, StepOutput, check_sizes
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SizePair, SpaceField, check_multiples
from seqpe_nd.tasks.recipes.vit_family import TransformerShape, classification_step


class VideoModelSettings(TransformerShape):
    """The video ViT (``model:``): a timm VisionTransformer with a tubelet patch embedding (a small one by default)."""

    img_size: PositiveInt = 32
    patch_size: PositiveInt = 8
    embed_dim: PositiveInt = 96
    depth: PositiveInt = 3
    num_heads: PositiveInt = 4
    mlp_ratio: float = Field(2.0, gt=0)
    frames: PositiveInt = 4
    """Training clip length T in frames."""
    tubelet: PositiveInt = 1
    """Frames per tubelet (1: each token sees one frame, so motion is only visible through positions)."""

    @model_validator(mode="after")
    def _check(self) -> "VideoModelSettings":
        self.check_shape()
        check_multiples(frames=(self.frames, "tubelet", self.tubelet))
        return self

    @property
    def grid(self) -> tuple[int, int, int]:
        """The training token grid (frames / tubelet, R / patch, R / patch)."""
        g = self.img_size // self.patch_size
        return (self.frames // self.tubelet, g, g)


class VideoEvalSettings(EvalSettings):
    """Evaluation (``eval:``) and validation during training."""

    sizes: list[SizePair] | None = None
    """(frames, pixels) pairs for ``seqpe-nd eval``; default (T, R), (2T, R), (3T, R), (T, 1.5R), (T, 2R), (2T, 2R)."""
    max_clips: PositiveInt | None = None
    """Evaluate only the first this many validation clips (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Clips per evaluation forward."""
    val_clips: PositiveInt = 256
    """Validation during training: the first this many clips at the training size."""


class VideoConfig(RunConfig):
    """A whole video run: one YAML file with ``task: video``."""

    task: Literal["video"] = "video"
    model: VideoModelSettings = VideoModelSettings()
    data: VideoDataConfig = VideoDataConfig()
    space: SpaceField
    """3-D position space (frame, row, col) whose L is the training token grid: inline, or a YAML path."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(
            integration="attn_mul", per_layer=True, hidden=64, heads=2, init="trunc_normal"
        )
    )
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope_axial, rope_mixed, seqpe, ...)."""
    random_shift: bool = False
    """Shift a whole step's token positions with the space's ``shift.prob`` (App. A.5; SeqPE runs)."""
    eval: VideoEvalSettings = VideoEvalSettings()

    @model_validator(mode="after")
    def _space_fits(self) -> "VideoConfig":
        space, m = self.grid_space(3), self.model
        if tuple(space.L) != m.grid:
            raise ValueError(
                f"space.L = {list(space.L)} must be the training token grid {list(m.grid)} (model.frames = "
                f"{m.frames} / tubelet = {m.tubelet}, model.img_size = {m.img_size} / patch_size = {m.patch_size})"
            )
        return self


def build_model(cfg: VideoConfig) -> ViTWithPE:
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
    return ViTWithPE.with_pe(vit, cfg.pe, cfg.space)


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


class VideoRecipe(Recipe[VideoConfig]):
    """Clip classification; evaluated by top-1 at more frames and at larger frames."""

    task = "video"
    config_type = VideoConfig
    main_loss = "cls_loss"
    no_decay_names = ("prefix_pos", "vit.cls_token", "vit.reg_token")  # as the image recipe

    def build_model(self) -> ViTWithPE:
        return build_model(self.cfg)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t, m = self.cfg.train, self.cfg.model
        first = self.first_sample(step, micro, rank, world)
        x, y = clip_batch(self.cfg.data, t.seed, "train", range(first, first + t.batch_size), m.frames, m.img_size)
        return {"clips": x, "targets": y}

    def shift_extent(self, model: nn.Module, batch: dict[str, Tensor]) -> list[int]:
        return list(unwrap(model).grid_shape(batch["clips"].shape))

    def step(
        self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        return classification_step(model, batch["clips"], batch["targets"], shift=shift, draws=draws,
                                   loss_fn=F.cross_entropy)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 on the first ``eval.val_clips`` validation clips at the training size."""
        m, e = self.cfg.model, self.cfg.eval
        count = min(e.val_clips, self.cfg.data.val_size)
        res = accuracy(model, self.cfg, m.frames, m.img_size, count, batch_size=e.batch_size, device=self.device_of(model))
        return {"top1": res["top1"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["clips"].shape[0])  # clips, for clips/s

    # -- evaluation -------------------------------------------------------------------------------
    def eval_plan(self) -> EvalPlan:
        """(frames, pixels) pairs: the config's ``eval.sizes``, else :func:`default_sizes`."""
        m, e = self.cfg.model, self.cfg.eval
        pairs = [tuple(s) for s in (e.sizes or default_sizes(m.frames, m.img_size, m.patch_size, m.tubelet))]
        check_sizes(pairs, lambda s: len(s) == 2 and s[0] >= m.tubelet and s[1] >= m.patch_size,
                    f"(frames >= tubelet = {m.tubelet}, pixels >= patch_size = {m.patch_size})", "eval size")
        count = min(self.cfg.data.val_size, e.max_clips or self.cfg.data.val_size)
        header = {"train_size": [m.frames, m.img_size]}
        return EvalPlan(pairs, header, context={"count": count, "batch_size": e.batch_size})

    def eval_size(self, model: nn.Module, size: tuple[int, int], plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        (f, s), m, c = size, self.cfg.model, plan.context
        res = accuracy(model, self.cfg, f, s, c["count"], batch_size=c["batch_size"], device=device)
        return {**res, "frames": f, "pixels": s, "grid": [f // m.tubelet, s // m.patch_size, s // m.patch_size]}

    def eval_table(self, result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        T, R = result["train_size"]
        title = f"{result['run_dir']} — top-1 vs clip size (trained at {T} frames × {R} px)"
        columns = ["frames", "pixels", "token grid", "clips", "top-1 %", "loss", "seconds"]
        cells = [
            [str(r["frames"]), str(r["pixels"]), "×".join(map(str, r["grid"])), str(r["clips"]), f"{r['top1']:.2f}",
             f"{r['loss']:.3f}", f"{r['seconds']:.1f}"]
            for r in result["sizes"].values()
        ]
        return title, columns, cells


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

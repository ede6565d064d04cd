"""The interleaved text + image recipe (``task: hybrid``): which image matches the reference?

Beyond the paper: one sequence interleaves text tokens and image patches
(:mod:`seqpe_nd.tasks.data.interleaved`), and every method sees the same sequence through the same
PositionEncoding interface. The backbone is
:class:`~seqpe_nd.tasks.backbones.interleaved.InterleavedTransformer`: timm ``Block``s whose
attention is the ViT adapter's ``PEAttention``, over text token embeddings and timm
``PatchEmbed`` patches placed in layout order.

**Readout, loss, metric.** Each image is read out at its ``[/image]`` word, the text token right
after its patches (or from the mean of its patches, ``model.readout: mean``), one logit per
image, so any number of images can be scored. The markers are identical tokens, so which image
a readout belongs to is decidable from positions alone, and unambiguously so: the readout is
strictly nearer its own image's patches than any other image's, under the hybrid metric and in
the flat index (see the data module). Every candidate carries its own binary label, "does it
match the reference?", trained with a per-candidate binary cross-entropy (``match_loss``). That
label is an interaction of two images (own colour × reference colour) and gives no first-order
gradient, so training alone on it sits on a plateau whose length depends on the schedule; an
auxiliary label per readout, the colour of its own image (``colour_loss``, weight
``colour_weight``, reference included), depends on one image only and leads every readout to its
own patches from the first step. Both are decidable only from positions.
Reported: ``top1``, the share of examples whose highest-scoring candidate is the answer (chance
``1/K``: targets are balanced over candidate slots), and ``per_image``, the share of candidates
whose own decision (logit > 0) is right (chance ``max(1/K, 1 - 1/K)``, always answering the
majority label).

Positions come from the hybrid space's layout (``HybridSpace.layout``): a text token at
timeline step ``t`` is ``(text, t, 0, 0)``, a patch of the image anchored at ``t`` is
``(image, t, row, col)``. ``positions:`` picks what the PE is given, which is a property of the
experiment, not of the method:

* ``hybrid``: those positions (SeqPE on the hybrid space and its metric, M-RoPE, ALiBi-ND, NoPE);
* ``flat``: the 1-D index of each token in the flattened sequence, on a 1-D grid space (the
  RoPE / APE baselines of a text-only model that reads images as runs of tokens).

Legend: b batch, k images, c channels, y/x pixels, n text tokens, s sequence tokens, w position
width, d model dim.
"""

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, PEDraws, SeqPEConfig, build_position_encoding
from seqpe_nd.positions import GridSpace, HybridSpace
from seqpe_nd.tasks.backbones.interleaved import InterleavedTransformer
from seqpe_nd.tasks.backbones.vit import PEOutput
from seqpe_nd.tasks.data.interleaved import (
    COLORS,
    MARKERS_PER_IMAGE,
    SENTENCE_LEN,
    VOCAB,
    HybridDataConfig,
    check_batch,
    example_batch,
    segments,
    timeline_length,
)
from seqpe_nd.tasks.recipes.base import EvalPlan, Recipe, StepOutput, check_sizes
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SizePair, SpaceField
from seqpe_nd.tasks.recipes.vit_family import TransformerShape


class HybridModelSettings(TransformerShape):
    """The interleaved transformer (``model:``), a small one by default."""

    img_size: PositiveInt = 32
    patch_size: PositiveInt = 8
    embed_dim: PositiveInt = 64
    depth: PositiveInt = 3
    num_heads: PositiveInt = 4
    mlp_ratio: float = Field(2.0, gt=0)
    num_images: PositiveInt = 2
    """Candidate images per training example K (a question about a reference shows it first)."""
    readout: Literal["marker", "mean"] = "marker"
    """Score each image at its ``[/image]`` word after its patches (marker) or from the mean of its patches (mean)."""

    @model_validator(mode="after")
    def _check(self) -> "HybridModelSettings":
        self.check_shape()
        return self

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)


class HybridEvalSettings(EvalSettings):
    """Evaluation (``eval:``) and validation during training."""

    sizes: list[SizePair] | None = None
    """(images, pixels) pairs for ``seqpe-nd eval``; default (K, R), (2K, R), (K, 1.5R), (K, 2R), (2K, 2R)."""
    max_examples: PositiveInt | None = None
    """Evaluate only the first this many validation examples (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Examples per evaluation forward."""
    val_examples: PositiveInt = 1024
    """Validation during training: the first this many examples at the training size."""


class HybridConfig(RunConfig):
    """A whole interleaved run: one YAML file with ``task: hybrid``."""

    task: Literal["hybrid"] = "hybrid"
    model: HybridModelSettings = HybridModelSettings()
    data: HybridDataConfig = HybridDataConfig()
    space: SpaceField
    """Hybrid space with a 1-D ``text`` and a 2-D ``image`` modality (inline or a YAML path); its
    timeline L is the training sequence's (5 + 3 × images shown) and its image L the training patch grid."""
    positions: Literal["hybrid", "flat"] = "hybrid"
    """What the PE sees: hybrid positions, or each token's index in the flattened sequence (1-D)."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(integration="attn_mul", per_layer=True, hidden=64, heads=2)
    )
    """Position encoding; ``method`` picks one (nope, seqpe, mrope, alibi_nd on hybrid; rope, ape_sin, ape_learn on flat)."""
    colour_weight: float = Field(1.0, ge=0.0)
    """Weight of the auxiliary loss in which every readout (reference included) names its own image's colour:
    a label that depends on one image alone, so its gradient leads each readout to its own patches from the
    first step (the match label alone is an interaction of two images, with a long plateau). 0: off."""
    random_shift: bool = False
    """Shift a whole step's positions with the space's ``shift.prob`` (App. A.5; one timeline shift for all modalities)."""
    eval: HybridEvalSettings = HybridEvalSettings()

    @property
    def shown(self) -> int:
        """Images in a training sequence: the candidates, plus the reference of a ``colour``/``place`` question."""
        return self.model.num_images + (self.data.question != "sentence")

    @model_validator(mode="after")
    def _space_fits(self) -> "HybridConfig":
        space, m = self.hybrid_space(), self.model
        names = {mod.name: mod.space.ndim for mod in space.modalities}
        if names.get("text") != 1 or names.get("image") != 2:
            raise ValueError(f"space: the hybrid recipe needs modalities 'text' (1-D) and 'image' (2-D), got {names}")
        image = space.modalities[space.modality_id("image")].space
        timeline = timeline_length(self.shown)
        if space.timeline is None or tuple(image.L) != m.grid or space.timeline.L != timeline:
            got = None if space.timeline is None else space.timeline.L
            raise ValueError(
                f"space: image L = {list(image.L)} and timeline L = {got} must be the training patch grid "
                f"{list(m.grid)} and timeline {timeline} (question {SENTENCE_LEN} + 3 × {self.shown} images shown)"
            )
        return self


def sequence_length(num_images: int, grid: Sequence[int]) -> int:
    """Tokens of a sequence with ``num_images`` images shown: the question, then ``[image]``, patches, ``[/image]``."""
    return SENTENCE_LEN + num_images * (MARKERS_PER_IMAGE + grid[0] * grid[1])


class HybridRecipe(Recipe[HybridConfig]):
    """Which image matches the reference (or sentence); evaluated with more and larger images."""

    task = "hybrid"
    config_type = HybridConfig
    strict_sections = ("task", "model", "space", "pe", "positions")
    main_loss = "task_loss"  # match_loss + colour_weight · colour_loss, each logged too
    no_decay_names = ("text_embed.weight",)

    def __init__(self, cfg: HybridConfig, run_dir: Path | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.space: HybridSpace = cfg.hybrid_space()
        n = sequence_length(cfg.shown, cfg.model.grid)
        # The flat view's 1-D space: trained on n tokens; L_max only sizes SeqPE's digits there.
        self.flat_space = GridSpace(L=(n,), L_max=(max(n, 10_000),))
        self.text_id = self.space.modality_id("text")
        self.image_id = self.space.modality_id("image")

    def shown_images(self, candidates: int) -> int:
        """Images in the sequence: the candidates, plus the reference of a ``colour``/``place`` question."""
        return candidates + (self.cfg.data.question != "sentence")

    @property
    def pe_space(self) -> GridSpace | HybridSpace:
        """The space the PE is built on and shifted in: the hybrid space, or the flat 1-D view."""
        return self.space if self.cfg.positions == "hybrid" else self.flat_space

    def layout(self, num_images: int, grid: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """(hybrid positions (s, w), is_image (s,)) of the interleaved sequence."""
        lay = self.space.layout(segments(num_images, (int(grid[0]), int(grid[1]))))
        return lay.positions.to(device), (lay.modality == self.image_id).to(device)

    def pe_positions(self, hybrid: Int[Tensor, "s w"], batch: int) -> Int[Tensor, "b s v"]:
        """The positions the PE is given: hybrid ones or the flattened index."""
        pos = hybrid if self.cfg.positions == "hybrid" else torch.arange(hybrid.shape[0], device=hybrid.device)[:, None]
        return pos.expand(batch, *pos.shape)

    @property
    def shift_space(self) -> GridSpace | HybridSpace:
        return self.pe_space

    def build_model(self) -> InterleavedTransformer:
        m = self.cfg.model
        pe = build_position_encoding(
            self.cfg.pe,
            space=self.pe_space,
            num_heads=m.num_heads,
            head_dim=m.embed_dim // m.num_heads,
            num_layers=m.depth,
            d_model=m.embed_dim,
        )
        return InterleavedTransformer(
            pe,
            vocab_size=len(VOCAB),
            patch_size=m.patch_size,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            readout=m.readout,
            num_classes=len(COLORS) if self.cfg.colour_weight > 0 else 0,
            drop_path_rate=m.drop_path_rate,
        )

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t, m = self.cfg.train, self.cfg.model
        first = self.first_sample(step, micro, rank, world)
        return example_batch(
            self.cfg.data, t.seed, "train", range(first, first + t.batch_size), m.num_images, m.img_size
        )

    def forward(self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None = None,
                draws: PEDraws | None = None) -> PEOutput:
        """The model on a batch (all rows share one layout); ``shift`` moves every position (one timeline shift)."""
        text, images = batch["text"], batch["images"]
        check_batch(text, images)
        grid = [s // self.cfg.model.patch_size for s in images.shape[-2:]]  # every shown image, reference included
        hybrid, is_image = self.layout(images.shape[1], grid, images.device)
        pos = self.pe_positions(hybrid, images.shape[0])
        if shift is not None:
            pos = self.pe_space.apply_shift(pos, shift.to(images.device, non_blocking=True)[:, None])
        out = model(text, images, pos, is_image, pe_draws=draws, pe_shifted=shift is not None)
        if self.cfg.data.question != "sentence":  # the reference is shown, not a candidate answer
            out = PEOutput(out.logits[:, 1:], out.pe_aux_loss, out.pe_logs, out.classes)
        return out

    def step(
        self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        out = self.forward(model, batch, shift=shift, draws=draws)
        targets = batch["targets"]
        main = match_loss(out.logits.float(), targets)
        metrics: dict[str, float | Tensor] = {
            "match_loss": main.detach(), "train_top1": 100.0 * (out.logits.argmax(-1) == targets).float().mean()
        }
        if out.classes is not None:  # every shown image's readout names its own image's colour
            colour = F.cross_entropy(out.classes.float().flatten(0, 1), batch["colours"].flatten())
            main = main + self.cfg.colour_weight * colour
            metrics["colour_loss"] = colour.detach()
        return StepOutput(main, out.pe_aux_loss, out.pe_logs, metrics)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on the first ``eval.val_examples`` validation examples at the training size."""
        m, e = self.cfg.model, self.cfg.eval
        count = min(e.val_examples, self.cfg.data.val_size)
        res = accuracy(self, model, m.num_images, m.img_size, count, batch_size=e.batch_size, device=self.device_of(model))
        return {"top1": res["top1"], "per_image": res["per_image"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["text"].shape[0])  # examples, for examples/s

    # -- evaluation -------------------------------------------------------------------------------
    def eval_plan(self) -> EvalPlan:
        """(images, pixels) pairs: the config's ``eval.sizes``, else :func:`default_sizes`."""
        m, e = self.cfg.model, self.cfg.eval
        pairs = [tuple(s) for s in (e.sizes or default_sizes(m.num_images, m.img_size, m.patch_size))]
        check_sizes(pairs, lambda s: len(s) == 2 and s[0] >= 1 and s[1] >= m.patch_size,
                    f"(images >= 1, pixels >= patch_size = {m.patch_size})", "eval size")
        count = min(self.cfg.data.val_size, e.max_examples or self.cfg.data.val_size)
        header = {"train_size": [m.num_images, m.img_size], "positions": self.cfg.positions}
        return EvalPlan(pairs, header, context={"count": count, "batch_size": e.batch_size})

    def eval_size(self, model: nn.Module, size: tuple[int, int], plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        (k, s), c = size, plan.context
        g = s // self.cfg.model.patch_size
        res = accuracy(self, model, k, s, c["count"], batch_size=c["batch_size"], device=device)
        return {**res, "images": k, "pixels": s, "grid": [g, g], "tokens": sequence_length(self.shown_images(k), (g, g))}

    def eval_table(self, result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        K, R = result["train_size"]
        title = f"{result['run_dir']} — matching accuracy (trained with {K} images of {R} px; {result['positions']} positions)"
        columns = ["images", "pixels", "patch grid", "tokens", "examples", "top-1 %", "chance %", "per-image %",
                   "chance %", "match loss", "seconds"]
        cells = [
            [str(r["images"]), str(r["pixels"]), "×".join(map(str, r["grid"])), str(r["tokens"]), str(r["examples"]),
             f"{r['top1']:.2f}", f"{r['chance']:.1f}", f"{r['per_image']:.2f}", f"{r['per_image_chance']:.1f}",
             f"{r['loss']:.3f}", f"{r['seconds']:.1f}"]
            for r in result["sizes"].values()
        ]
        return title, columns, cells


def match_loss(logits: Float[Tensor, "b k"], targets: Int[Tensor, " b"]) -> Float[Tensor, ""]:
    """Binary cross-entropy of every candidate's own label (does it match?), averaged over candidates."""
    labels = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, labels)


@torch.no_grad()
def accuracy(
    task: HybridRecipe, model: nn.Module, num_images: int, size: int, count: int, *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 and per-image accuracy (%, with their chance levels) and the match loss of the first ``count``
    validation examples with ``num_images`` candidates of ``size`` px."""
    cfg = task.cfg
    top1 = right = loss = seen = 0.0
    compute, t0 = 0.0, time.perf_counter()
    for s in range(0, count, batch_size):
        batch = example_batch(cfg.data, cfg.train.seed, "validation", range(s, min(count, s + batch_size)), num_images, size)
        batch = {k: v.to(device) for k, v in batch.items()}
        t = time.perf_counter()
        logits = task.forward(model, batch).logits.float()  # (b, k)
        compute += time.perf_counter() - t
        y = batch["targets"]
        top1 += float((logits.argmax(-1) == y).sum())
        right += float(((logits > 0) == F.one_hot(y, num_images).bool()).float().mean(-1).sum())
        loss += float(match_loss(logits, y)) * len(y)
        seen += len(y)
    if seen == 0:
        raise ValueError("no examples to evaluate; raise the number of evaluation examples")
    return {
        "top1": 100.0 * top1 / seen,
        "per_image": 100.0 * right / seen,
        "loss": loss / seen,
        "examples": int(seen),
        "seconds": time.perf_counter() - t0,
        "examples_per_s": seen / max(compute, 1e-9),
        "chance": 100.0 / num_images,
        "per_image_chance": 100.0 * max(1.0 / num_images, 1.0 - 1.0 / num_images),
    }


def default_sizes(num_images: int, img_size: int, patch_size: int) -> list[tuple[int, int]]:
    """(K, R), (2K, R), (K, 1.5R), (K, 2R), (2K, 2R), sizes rounded to whole patches."""

    def px(f: float) -> int:
        return max(patch_size, round(img_size * f / patch_size) * patch_size)

    return [
        (num_images, img_size),
        (2 * num_images, img_size),
        (num_images, px(1.5)),
        (num_images, px(2)),
        (2 * num_images, px(2)),
    ]

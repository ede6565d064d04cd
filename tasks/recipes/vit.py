"""The ViT recipe of §4.3 (Tables 3, 5): timm's VisionTransformer + any position encoding, trained at one
resolution and evaluated at larger ones (resize 256/224·S, centre-crop S, same patch size).

The backbone is :mod:`seqpe_nd.tasks.backbones.vit` (timm at its own seams); the images are
:mod:`seqpe_nd.tasks.data.vision`. Evaluation writes ``eval.json``, ``eval.png`` (top-1 against
resolution) and, for methods with a per-position vector, ``pe_similarity.png`` (Fig. 3).

Legend: b batch, n patch tokens.
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, PEDraws, SeqPEConfig
from seqpe_nd.tasks.backbones.vit import ViTWithPE, create_vit
from seqpe_nd.tasks.data.vision import ImageSource, Prefetcher, TrainBatches, VisionDataConfig, eval_images
from seqpe_nd.tasks.engine.evaluation import classify
from seqpe_nd.tasks.engine.trainer import unwrap
from seqpe_nd.tasks.recipes.base import EVAL_PNG, EvalPlan, Recipe, StepOutput, check_sizes
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SpaceField
from seqpe_nd.tasks.recipes.vit_family import TransformerShape, classification_step

SIMILARITY_PNG = "pe_similarity.png"


class ViTSettings(TransformerShape):
    """The ViT backbone (``model:``): a timm model by ``name``, or the shape of :class:`TransformerShape`."""

    name: str | None = None
    """timm model name (``vit_small_patch16_224`` = ViT-S/16), which fixes the shape (patch_size must match it);
    None builds the shape."""

    @model_validator(mode="after")
    def _check(self) -> "ViTSettings":
        shape = sorted({"embed_dim", "depth", "num_heads", "mlp_ratio"} & self.model_fields_set)
        if self.name is not None and shape:
            raise ValueError(
                f"name = {self.name!r} fixes the architecture, so {', '.join(shape)} would be ignored; "
                "remove them, or remove name to build that shape"
            )
        self.check_shape(width=self.name is None)
        return self


class ViTEvalSettings(EvalSettings):
    """Evaluation (``eval:``) and validation during training."""

    resolutions: list[PositiveInt] | None = None
    """Resolutions S for ``seqpe-nd eval``; default Table 3's 224, 320, 384, 448, 512, 640, 672 scaled to R."""
    max_images: PositiveInt | None = None
    """Evaluate only the first this many validation images (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Images per evaluation forward."""
    val_images: PositiveInt = 512
    """Validation during training: the first this many images at the training resolution."""


class ViTConfig(RunConfig):
    """A whole ViT run: one YAML file with ``task: vit``."""

    task: Literal["vit"] = "vit"
    model: ViTSettings = ViTSettings()
    data: VisionDataConfig = VisionDataConfig()
    space: SpaceField = Field("configs/positions/image-14x14.yaml", validate_default=True)
    """2-D position space whose L is the training patch grid: inline, or a YAML path (see RunConfig.space)."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(integration="attn_mul", per_layer=True, hidden=384, init="trunc_normal")
    )
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope_axial, rope_mixed, seqpe, ...)."""
    random_shift: bool = False
    """Shift a whole step's patch positions with the space's ``shift.prob`` (App. A.5; SeqPE runs)."""
    eval: ViTEvalSettings = ViTEvalSettings()

    @model_validator(mode="after")
    def _space_fits(self) -> "ViTConfig":
        space, m = self.grid_space(2), self.model
        grid = m.img_size // m.patch_size
        if tuple(space.L) != (grid, grid):
            raise ValueError(
                f"space.L = {list(space.L)} must be the training patch grid [{grid}, {grid}] "
                f"(model.img_size = {m.img_size} / model.patch_size = {m.patch_size})"
            )
        return self


def build_model(cfg: ViTConfig) -> ViTWithPE:
    """A randomly initialised ViT whose positions come from ``cfg.pe``."""
    m = cfg.model
    # A timm name fixes the architecture (the settings refuse a shape beside it); patch_size is checked below.
    shape = {} if m.name else dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                                   num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
    vit = create_vit(m.name, img_size=m.img_size, num_classes=cfg.data.classes, drop_path_rate=m.drop_path_rate, **shape)
    if tuple(vit.patch_embed.patch_size) != (m.patch_size, m.patch_size):
        raise ValueError(
            f"model.patch_size = {m.patch_size} but timm model {m.name!r} has patch size {vit.patch_embed.patch_size}"
        )
    return ViTWithPE.with_pe(vit, cfg.pe, cfg.space)


def criterion(cfg: ViTConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """timm's losses: soft-target CE after Mixup/CutMix (smoothing inside), label smoothing, or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    aug = cfg.data.augment
    if aug.mixing:
        return SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def accuracy(
    model: nn.Module, source: ImageSource, size: int, indices: Sequence[int], *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 accuracy and loss of ``indices`` at resolution ``size`` (the paper's resize + centre crop)."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(0, len(indices), batch_size):
            x, y = eval_images(source, size, indices[s : s + batch_size])
            yield x.to(device), y.to(device)

    return classify(lambda x: model(x).logits, batches(), unit="images")


class ViTRecipe(Recipe[ViTConfig]):
    """Image classification; evaluated by top-1 at larger resolutions."""

    task = "vit"
    config_type = ViTConfig
    main_loss = "cls_loss"
    no_decay_names = ("prefix_pos", "vit.cls_token", "vit.reg_token")  # timm exempts cls_token and pos_embed
    rows_key = "resolutions"

    def __init__(self, cfg: ViTConfig, run_dir: Path | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.loss_fn = criterion(cfg)
        self._batches: Prefetcher | None = None
        self._val: ImageSource | None = None

    def prepare_data(self) -> None:
        """The validation images, opened before the loop builds the model: a data set the hub cannot give, or a
        missing ImageFolder split, stops the run before any file is written."""
        self.val_source()

    def build_model(self) -> ViTWithPE:
        return build_model(self.cfg)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t = self.cfg.train
        if self._batches is None:
            data = TrainBatches(self.cfg.data, self.cfg.model.img_size, t.seed)
            self._batches = Prefetcher(data, self.cfg.data.workers, stride=t.batch_size * world)
        first = self.first_sample(step, micro, rank, world)
        return self._batches(first, t.batch_size)

    def shift_extent(self, model: nn.Module, batch: dict[str, Tensor]) -> list[int]:
        return list(unwrap(model).grid_shape(batch["images"].shape))

    def step(
        self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        return classification_step(model, batch["images"], batch["targets"], shift=shift, draws=draws,
                                   loss_fn=self.loss_fn)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 on the first ``eval.val_images`` validation images at the training resolution."""
        source = self.val_source()
        n = min(len(source), self.cfg.eval.val_images)
        res = accuracy(model, source, self.cfg.model.img_size, range(n), batch_size=self.cfg.eval.batch_size,
                       device=self.device_of(model))
        return {"top1": res["top1"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["images"].shape[0])  # images, for images/s

    def val_source(self) -> ImageSource:
        if self._val is None:
            self._val = ImageSource(self.cfg.data, "validation", self.cfg.train.seed)
        return self._val

    # -- evaluation -------------------------------------------------------------------------------
    def eval_plan(self) -> EvalPlan:
        """§4.3: every resolution S is resized to 256/224·S, centre-cropped to S and cut into the same patches."""
        m, e = self.cfg.model, self.cfg.eval
        sizes = list(e.resolutions or default_resolutions(m.img_size, m.patch_size))
        check_sizes(sizes, lambda s: s >= m.patch_size and s % m.patch_size == 0,
                    f"multiples of the patch size {m.patch_size} px", "resolution")
        source = self.val_source()
        count = len(source) if e.max_images is None else min(len(source), e.max_images)
        header = {"train_resolution": m.img_size, "patch_size": m.patch_size, "data": self.cfg.data.source}
        return EvalPlan(sizes, header, context={"count": count, "batch_size": e.batch_size})

    def eval_size(self, model: nn.Module, size: int, plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        c = plan.context
        res = accuracy(model, self.val_source(), size, range(c["count"]), batch_size=c["batch_size"], device=device)
        return {**res, "grid": size // self.cfg.model.patch_size}

    def write_figures(self, result: dict[str, Any], model: nn.Module) -> None:
        from seqpe_nd.tasks.engine.plots import plot_accuracy, plot_similarity

        assert self.run_dir is not None
        largest = max(int(s) for s in result["resolutions"])
        grid = (largest // self.cfg.model.patch_size,) * 2
        sim = position_similarity(model, grid)  # type: ignore[arg-type]
        if sim is not None:
            title = f"{self.run_dir.name}: PE dot products on the {grid[0]}×{grid[1]} grid of {largest} px"
            plot_similarity(sim, grid, self.run_dir / SIMILARITY_PNG, title=title)
            result["similarity_png"] = SIMILARITY_PNG
        plot_accuracy({self.run_dir.name: result}, self.run_dir / EVAL_PNG)

    def eval_table(self, result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        R = result["train_resolution"]
        title = f"{result['run_dir']} — top-1 vs resolution (trained at {R} px, {result['data']} data)"
        columns = ["resolution", "× train", "grid", "images", "top-1 %", "loss", "img/s", "seconds"]
        cells = [
            [s, f"{int(s) / R:g}", f"{r['grid']}×{r['grid']}", str(r["images"]), f"{r['top1']:.2f}", f"{r['loss']:.3f}",
             f"{r['images_per_s']:.0f}", f"{r['seconds']:.1f}"]
            for s, r in result["resolutions"].items()
        ]
        return title, columns, cells

    @classmethod
    def plot_runs(cls, results: Any, path: Path, *, title: str) -> Path:
        from seqpe_nd.tasks.engine.plots import plot_accuracy

        return plot_accuracy(dict(results), path, title=title)


PAPER_RATIOS: tuple[float, ...] = (224 / 224, 320 / 224, 384 / 224, 448 / 224, 512 / 224, 640 / 224, 672 / 224)
"""Table 3's columns as multiples of the training resolution (224 … 672 px)."""


def default_resolutions(img_size: int, patch_size: int) -> list[int]:
    """Table 3's resolutions scaled to R, rounded to whole patches (224, 320, …, 672 for ViT-S/16 at 224)."""
    out = [max(patch_size, round(img_size * f / patch_size) * patch_size) for f in PAPER_RATIOS]
    return sorted(set(out))


@torch.no_grad()
def position_similarity(model: ViTWithPE, grid: Sequence[int]) -> Float[Tensor, "5 n"] | None:
    """Fig. 3: dot products of the four corners' and the centre's position embedding with every
    position of ``grid``. The embedding is ``pe.embed`` where the method has one (APE), else the
    SeqPE encoder's output; None for methods without per-position vectors (RoPE, NoPE)."""
    state = model.prepare_state(grid)
    emb = model.pe.embed(state)
    if emb is not None:
        emb = emb[0, model.pe.num_prefix :]
    else:
        encoder = getattr(model.pe.inner, "encoder", None)  # SeqPE's attention integrations
        if encoder is None:
            return None
        emb = encoder(state.pos_q[:, model.pe.num_prefix :])[0]
    emb = emb.float()  # (n, d)
    H, W = grid
    probes = [0, W - 1, (H - 1) * W, H * W - 1, (H // 2) * W + W // 2]  # corners, centre (row-major)
    return emb[probes] @ emb.T

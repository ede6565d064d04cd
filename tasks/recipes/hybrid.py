"""The interleaved text + image recipe (``task: hybrid``): which image matches the sentence?

Beyond the paper: one sequence interleaves text tokens and image patches
(:mod:`seqpe_nd.tasks.data.interleaved`), and every method sees the same sequence through the same
PositionEncoding interface. The backbone is a small stack of timm ``Block``s whose attention is
the ViT adapter's :class:`~seqpe_nd.tasks.recipes.vit.PEAttention` (timm's ``Attention`` with
``pe.attend`` in place of SDPA), over ``[text token embeddings | timm PatchEmbed patches]``
placed in layout order. Each image's answer score is the mean of its patches' final features
through one linear layer, so any number of images can be scored.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, SeqPEConfig, build_position_encoding, pe_metrics
from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.positions import GridSpace, HybridSpace
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON as EVAL_JSON, classify, reject_unknown_options, write_result
from seqpe_nd.tasks.data.interleaved import SENTENCE_LEN, VOCAB, HybridDataConfig, check_batch, example_batch, segments
from seqpe_nd.tasks.engine.trainer import TrainConfig, unwrap
from seqpe_nd.tasks.recipes.video import load_space_source, load_trained, pick_device, validate_config
from seqpe_nd.tasks.recipes.vit import PEAttention, _Forward, _Hub, load_run_config

STRICT_SECTIONS: tuple[str, ...] = ("task", "model", "space", "pe", "positions")


# =====================================================================================================
# The backbone
# =====================================================================================================


class HybridOutput(NamedTuple):
    logits: Tensor
    """(b, k): one score per image."""
    aux_loss: Tensor | None
    """The PE's auxiliary loss (SeqPE α·L_δ + β·L_OOD) in training, else None."""
    logs: dict[str, Any] | None = None
    """The PE's training logs (SeqPE: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_cos``)."""


class InterleavedTransformer(nn.Module):
    """timm ``Block``s with :class:`PEAttention` over interleaved text tokens and image patches."""

    def __init__(
        self,
        pe: PositionEncoding,
        *,
        vocab_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        readout: Literal["marker", "mean"] = "marker",
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.readout = readout
        if pe.num_layers != depth or pe.num_heads != num_heads or pe.head_dim * num_heads != embed_dim:
            raise ValueError(
                f"PE sized for {pe.num_layers} layers × {pe.num_heads} heads × {pe.head_dim} dims, the model has {depth} × {num_heads} × {embed_dim // num_heads}"
            )
        self.text_embed = nn.Embedding(vocab_size, embed_dim)
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], attn_layer=PEAttention)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.score = nn.Linear(embed_dim, 1)
        self.apply(init_weights_vit_timm)
        nn.init.trunc_normal_(self.text_embed.weight, std=0.02)
        self.pe = pe
        self._hub = _Hub()
        self._hub.pe = pe
        for i, blk in enumerate(self.blocks):
            blk.attn.bind(self._hub, i)

    def forward(
        self,
        text: Int[Tensor, "b n"],
        images: Float[Tensor, "b k c y x"],
        positions: Int[Tensor, "b s w"],
        is_image: Bool[Tensor, " s"],
        *,
        pe_generator: torch.Generator | None = None,
        pe_shifted: bool = False,
    ) -> HybridOutput:
        """Scores of each image for a batch sharing one layout.

        Args:
            positions: what the PE is given for every sequence token (its own position view).
            is_image: which sequence slots hold patches (row-major, image after image); the others
                take the text tokens in order.
        """
        B, K = images.shape[:2]
        t_emb = self.text_embed(text)  # (b, n, d)
        patches = self.patch_embed(images.flatten(0, 1))  # (b*k, gy, gx, d)
        per_image = patches.shape[1] * patches.shape[2]
        p_emb = patches.reshape(B, K * per_image, -1)  # (b, k*p, d)
        if int(is_image.sum()) != K * per_image or int((~is_image).sum()) != text.shape[1]:
            raise ValueError(
                f"layout has {int(is_image.sum())} patch and {int((~is_image).sum())} text slots, the batch "
                f"{K} images × {per_image} patches and {text.shape[1]} text tokens"
            )
        # Sequence slot -> source row in [text | patches], so the interleaving is one gather.
        src = torch.empty(is_image.shape[0], dtype=torch.int64, device=text.device)
        src[~is_image] = torch.arange(text.shape[1], device=text.device)
        src[is_image] = text.shape[1] + torch.arange(K * per_image, device=text.device)
        x = torch.cat([t_emb, p_emb], 1)[:, src]  # (b, s, d)

        state = self.pe.prepare(positions, generator=pe_generator, shifted=pe_shifted)
        self._hub.current = _Forward(generator=pe_generator, shifted=pe_shifted, state=state)
        try:
            e = self.pe.embed(state)
            if e is not None:
                x = x + e.to(x.dtype)
            x = self.norm(self.blocks(x))
        finally:
            self._hub.current = None
        if self.readout == "mean":  # each image's own patches, averaged
            pooled = x[:, is_image].reshape(B, K, per_image, -1).mean(2)  # (b, k, d)
        else:  # the [image] word just before each image, which must find its image through positions
            starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
            pooled = x[:, torch.nonzero(starts)[:, 0] - 1]  # (b, k, d)
        return HybridOutput(self.score(pooled).squeeze(-1), state.aux_loss, state.logs)


# =====================================================================================================
# The recipe: configs
# =====================================================================================================


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class HybridModelSettings(_Section):
    """The interleaved transformer (``model:``)."""

    img_size: PositiveInt = 32
    """Training image size R in pixels (square)."""
    num_images: PositiveInt = 2
    """Candidate images per training example K (a question about a reference shows it first)."""
    patch_size: PositiveInt = 8
    """Patch size."""
    embed_dim: PositiveInt = 64
    """Width."""
    depth: PositiveInt = 3
    """Blocks."""
    num_heads: PositiveInt = 4
    """Attention heads."""
    mlp_ratio: float = Field(2.0, gt=0)
    """MLP width ratio."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth."""
    readout: Literal["marker", "mean"] = "marker"
    """Score each image at its ``[image]`` word (marker) or from the mean of its patches (mean)."""

    @model_validator(mode="after")
    def _check(self) -> "HybridModelSettings":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim = {self.embed_dim} must be divisible by num_heads = {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size = {self.img_size} must be a multiple of patch_size = {self.patch_size}")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)


class HybridEvalSettings(_Section):
    """Evaluation (``eval:``) and validation during training."""

    sizes: list[tuple[PositiveInt, PositiveInt]] | None = None
    """(images, pixels) pairs for ``seqpe-nd eval``; default (K, R), (2K, R), (K, 1.5R), (K, 2R), (2K, 2R)."""
    max_examples: PositiveInt | None = None
    """Evaluate only the first this many validation examples (None: the whole split)."""
    batch_size: PositiveInt = 64
    """Examples per evaluation forward."""
    val_examples: PositiveInt = 256
    """Validation during training: the first this many examples at the training size."""


class HybridConfig(_Section):
    """A whole interleaved run: one YAML file with ``task: hybrid``."""

    task: Literal["hybrid"] = "hybrid"
    model: HybridModelSettings = HybridModelSettings()
    data: HybridDataConfig = HybridDataConfig()
    space: dict[str, Any] | str
    """Hybrid space with a 1-D ``text`` and a 2-D ``image`` modality (inline or a YAML path); its
    timeline L is the training sequence's (5 + 2 × images shown) and its image L the training patch grid."""
    positions: Literal["hybrid", "flat"] = "hybrid"
    """What the PE sees: hybrid positions, or each token's index in the flattened sequence (1-D)."""
    pe: PEConfig = Field(
        default_factory=lambda: SeqPEConfig(integration="attn_mul", per_layer=True, hidden=64, heads=2)
    )
    """Position encoding; ``method`` picks one (nope, seqpe, mrope, alibi_nd on hybrid; rope, ape_sin, ape_learn on flat)."""
    random_shift: bool = False
    """Shift a whole step's positions with the space's ``shift.prob`` (App. A.5; one timeline shift for all modalities)."""
    train: TrainConfig = TrainConfig()
    eval: HybridEvalSettings = HybridEvalSettings()


def resolve_space(source: dict[str, Any] | str) -> HybridSpace:
    """The hybrid space of a config's ``space:`` (inline or a YAML path, relative to cwd or the repo)."""
    space = load_space_source(source)
    if not isinstance(space, HybridSpace):
        raise ValueError(f"space: the hybrid recipe needs a hybrid space (kind: hybrid), got kind {space.kind!r}")
    names = {m.name: m.space.ndim for m in space.modalities}
    if names.get("text") != 1 or names.get("image") != 2:
        raise ValueError(f"space: the hybrid recipe needs modalities 'text' (1-D) and 'image' (2-D), got {names}")
    return space


def parse_config(config: dict[str, Any] | HybridConfig) -> HybridConfig:
    """Validate a run config; errors name the dotted field path."""
    return validate_config(HybridConfig, config)


def sequence_length(num_images: int, grid: Sequence[int]) -> int:
    return SENTENCE_LEN + num_images * (1 + grid[0] * grid[1])


class HybridTask:
    """TrainTask of the hybrid recipe (see :class:`seqpe_nd.tasks.engine.trainer.TrainTask`)."""

    def __init__(self, cfg: HybridConfig, run_dir: Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.space = resolve_space(cfg.space)
        m = cfg.model
        image = self.space.modalities[self.space.modality_id("image")].space
        shown = self.shown_images(m.num_images)
        timeline = SENTENCE_LEN + 2 * shown
        assert self.space.timeline is not None
        if tuple(image.L) != m.grid or self.space.timeline.L != timeline:
            raise ValueError(
                f"space: image L = {list(image.L)} and timeline L = {self.space.timeline.L} must be the training "
                f"patch grid {list(m.grid)} and timeline {timeline} (question {SENTENCE_LEN} + 2 × {shown} images shown)"
            )
        n = sequence_length(shown, m.grid)
        # The flat view's 1-D space: trained on n tokens; L_max only sizes SeqPE's digits there.
        self.flat_space = GridSpace(L=(n,), L_max=(max(n, 10_000),))
        self.text_id = self.space.modality_id("text")
        self.image_id = self.space.modality_id("image")

    def shown_images(self, candidates: int) -> int:
        """Images in the sequence: the candidates, plus the reference of a ``colour``/``place`` question."""
        return candidates + (self.cfg.data.question != "sentence")

    @property
    def pe_space(self) -> GridSpace | HybridSpace:
        return self.space if self.cfg.positions == "hybrid" else self.flat_space

    def layout(self, num_images: int, grid: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """(hybrid positions (s, w), is_image (s,)) of the interleaved sequence."""
        lay = self.space.layout(segments(num_images, (int(grid[0]), int(grid[1]))))
        return lay.positions.to(device), (lay.modality == self.image_id).to(device)

    def pe_positions(self, hybrid: Int[Tensor, "s w"], batch: int) -> Int[Tensor, "b s v"]:
        """The positions the PE is given: hybrid ones or the flattened index."""
        pos = hybrid if self.cfg.positions == "hybrid" else torch.arange(hybrid.shape[0], device=hybrid.device)[:, None]
        return pos.expand(batch, *pos.shape)

    # -- TrainTask ------------------------------------------------------------------------
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
            drop_path_rate=m.drop_path_rate,
        )

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t, m = self.cfg.train, self.cfg.model
        first = ((step * t.grad_accum + micro) * world + rank) * t.batch_size
        return example_batch(
            self.cfg.data, t.seed, "train", range(first, first + t.batch_size), m.num_images, m.img_size
        )

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
        shift: bool = False,
    ) -> HybridOutput:
        """The model on a batch (all rows share one layout), with an optional random start shift."""
        text, images = batch["text"], batch["images"]
        check_batch(text, images)
        grid = [s // self.cfg.model.patch_size for s in images.shape[-2:]]  # every shown image, reference included
        hybrid, is_image = self.layout(images.shape[1], grid, images.device)
        shifted = False
        if shift and generator is not None:
            sh = self.pe_space.sample_shift(generator)
            if sh.applied:  # the whole step starts at z: one timeline shift for text and images (App. A.5)
                shifted = True
                base = (
                    hybrid
                    if self.cfg.positions == "hybrid"
                    else torch.arange(hybrid.shape[0], device=images.device)[:, None]
                )
                pos = self.pe_space.apply_shift(base, sh.z.to(images.device)).expand(images.shape[0], -1, -1)
        if not shifted:
            pos = self.pe_positions(hybrid, images.shape[0])
        out = model(text, images, pos, is_image, pe_generator=generator, pe_shifted=shifted)
        if self.cfg.data.question != "sentence":  # the reference is shown, not a candidate answer
            out = HybridOutput(out.logits[:, 1:], out.aux_loss, out.logs)
        return out

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        out = self.forward(model, batch, generator=generator, shift=self.cfg.random_shift)
        targets = batch["targets"]
        main = F.cross_entropy(out.logits.float(), targets)
        metrics: dict[str, float | Tensor] = {
            "match_loss": float(main.detach()),
            "train_top1": 100.0 * float((out.logits.argmax(-1) == targets).float().mean()),
        }
        total = main
        if out.aux_loss is not None:
            total = total + out.aux_loss
        metrics.update(pe_metrics(out.aux_loss, out.logs))
        return total, metrics

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on the first ``eval.val_examples`` validation examples at the training size."""
        device = next(unwrap(model).parameters()).device
        m, e = self.cfg.model, self.cfg.eval
        res = accuracy(
            self,
            model,
            m.num_images,
            m.img_size,
            min(e.val_examples, self.cfg.data.val_size),
            batch_size=e.batch_size,
            device=device,
        )
        return {"top1": res["top1"], "loss": res["loss"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["text"].shape[0])  # examples, for examples/s

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim < 2 or name.startswith("pe.") or name.startswith("text_embed.")

    def config_dict(self) -> dict[str, Any]:
        out = self.cfg.model_dump(mode="json", exclude={"train"})
        out["space"] = self.space.model_dump(mode="json")
        return out


def build_task(config: dict[str, Any], run_dir: Path) -> HybridTask:
    """The recipe entry point (``task: hybrid``)."""
    return HybridTask(parse_config(config), run_dir)


@torch.no_grad()
def accuracy(
    task: HybridTask, model: nn.Module, num_images: int, size: int, count: int, *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Matching accuracy and loss of the first ``count`` validation examples with ``num_images`` images of ``size`` px."""
    cfg = task.cfg

    def batches() -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        for s in range(0, count, batch_size):
            batch = example_batch(
                cfg.data, cfg.train.seed, "validation", range(s, min(count, s + batch_size)), num_images, size
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            yield batch, batch["targets"]

    return {
        **classify(lambda b: task.forward(model, b).logits, batches(), unit="examples"),
        "chance": 100.0 / num_images,
    }


# =====================================================================================================
# Evaluation: more and larger images
# =====================================================================================================


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


def load_model(run_dir: Path, *, task: HybridTask | None = None) -> InterleavedTransformer:
    """The trained model of a run in eval mode; a checkpoint whose model/space/PE differs says which field."""
    task = task or HybridTask(parse_config(load_run_config(run_dir)), run_dir)
    return load_trained(run_dir, task, STRICT_SECTIONS)  # type: ignore[return-value]


def evaluate(
    run_dir: Path,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    write: bool = True,
    quiet: bool = False,
    **unused: Any,
) -> dict[str, Any]:
    """Matching accuracy of a trained run at each (images, pixels) size; writes ``eval.json`` atomically.

    Args:
        sizes: (images, pixels) pairs; default the config's ``eval.sizes`` or :func:`default_sizes`.
    """
    reject_unknown_options("hybrid", unused, ("sizes", "max_examples", "batch_size", "device"))
    run_dir = Path(run_dir)
    cfg = parse_config(load_run_config(run_dir))
    task = HybridTask(cfg, run_dir)
    m = cfg.model
    pairs = [
        tuple(int(v) for v in s)
        for s in (sizes or cfg.eval.sizes or default_sizes(m.num_images, m.img_size, m.patch_size))
    ]
    for s in pairs:
        if len(s) != 2 or s[0] < 1 or s[1] < m.patch_size:
            raise ValueError(f"eval size {list(s)} must be (images >= 1, pixels >= patch_size = {m.patch_size})")
    dev = pick_device(device)
    model = load_model(run_dir, task=task).to(dev)
    n = min(cfg.data.val_size, max_examples or cfg.eval.max_examples or cfg.data.val_size)
    bs = batch_size or cfg.eval.batch_size
    t0 = time.perf_counter()
    rows = {}
    for k, s in pairs:
        g = s // m.patch_size
        rows[f"{k}x{s}"] = {
            **accuracy(task, model, k, s, n, batch_size=bs, device=dev),
            "images": k,
            "pixels": s,
            "grid": [g, g],
            "tokens": sequence_length(task.shown_images(k), (g, g)),
        }
    result = {
        "run_dir": str(run_dir),
        "train_size": [m.num_images, m.img_size],
        "positions": cfg.positions,
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

    K, R = result["train_size"]
    table = Table(
        title=f"{result['run_dir']} — matching accuracy (trained with {K} images of {R} px; {result['positions']} positions)"
    )
    for col in ("images", "pixels", "patch grid", "tokens", "examples", "top-1 %", "chance %", "loss", "seconds"):
        table.add_column(col, justify="right")
    for r in result["sizes"].values():
        table.add_row(
            str(r["images"]),
            str(r["pixels"]),
            "×".join(map(str, r["grid"])),
            str(r["tokens"]),
            str(r["examples"]),
            f"{r['top1']:.2f}",
            f"{r['chance']:.1f}",
            f"{r['loss']:.3f}",
            f"{r['seconds']:.1f}",
        )
    Console().print(table)

"""Image data for the ViT recipe: ImageNet-1k (``datasets`` or an ImageFolder), and an embedded,
download-free procedural data set whose labels only positions can tell apart.

The procedural scenes hold one red and one blue shape (plus grey distractors); the class is
where the red shape lies relative to the blue one (left of / right of / above / below). Every
class has the same content, so a model without positions (NoPE) sees the same bag of patches
for every class and stays near chance. A scene is a resolution-free description (centres and
radii in the unit square), rendered anti-aliased at any size, so the same scene can be shown at
the training resolution R and at 3R. Everything is a pure function of ``(seed, split, index)``.

Augmentation is timm's own (``create_transform``: RandomResizedCrop, RandAugment, random
erasing; ``Mixup`` for Mixup/CutMix with label smoothing). Each sample's random draws are seeded
from its global index, so a batch is a pure function of the step and a resumed run sees the
same augmented images. For the procedural data, horizontal flips (and RandAugment's
rotations/shears beyond small angles) would change "left of" into "right of": the smoke configs
switch flips off and keep geometric augmentation mild.

Legend: b batch, c channels, y/x pixels.
"""

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from PIL import Image
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.hub import hub_dataset
from seqpe_nd.tasks.data.scenes import ProceduralSettings, make_scene, render

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256
"""The paper's protocol: resize to 256/224·S, centre-crop S (timm's ``crop_pct``)."""

class AugmentSettings(Frozen):
    """Train-time augmentation by timm (``data.augment``).

    DeiT: rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1."""

    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    """Horizontal-flip probability (0 for the procedural data: a flip swaps left and right)."""
    auto_augment: str | None = None
    """timm auto-augment policy string, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment m9); None disables."""
    color_jitter: float | None = None
    """Colour jitter strength (timm ignores it when auto_augment is set); None disables."""
    re_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Random-erasing probability."""
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    """Random-erasing fill."""
    mixup: float = Field(0.0, ge=0.0)
    """Mixup alpha; 0 disables."""
    cutmix: float = Field(0.0, ge=0.0)
    """CutMix alpha; 0 disables."""
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)
    """Probability of mixing a batch at all."""
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of CutMix instead of Mixup when both are on."""
    smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing (in Mixup's soft targets, or timm's LabelSmoothingCrossEntropy)."""
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    """Resampling of the crops."""

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class VisionDataConfig(Frozen):
    """Where images come from (``data:``)."""

    source: Literal["procedural", "imagefolder", "hf"] = "procedural"
    """procedural (embedded, no download), imagefolder (``root/<split>/<class>/*``) or hf (``datasets``)."""
    root: str | None = None
    """ImageFolder root holding one folder per split."""
    hf_name: str = "ILSVRC/imagenet-1k"
    """Hugging Face data set (``image`` and ``label`` columns)."""
    train_split: str = "train"
    """Training split name (folder or ``datasets`` split)."""
    val_split: str = "validation"
    """Validation/evaluation split name (ImageFolder ImageNet usually calls it ``val``)."""
    num_classes: PositiveInt | None = None
    """Classes; default 1000 for ImageNet sources, ``procedural.classes`` for procedural data."""
    procedural: ProceduralSettings = ProceduralSettings()
    augment: AugmentSettings = AugmentSettings()
    workers: int = Field(0, ge=0)
    """Processes that prepare upcoming training batches ahead of the loop (0: in the loop)."""

    @model_validator(mode="after")
    def _check(self) -> "VisionDataConfig":
        if self.source == "imagefolder" and not self.root:
            raise ValueError(
                "data.root is required when data.source = 'imagefolder' (a folder with one sub-folder per split)"
            )
        if self.source == "procedural" and self.num_classes not in (None, self.procedural.classes):
            raise ValueError(
                f"data.num_classes = {self.num_classes} disagrees with "
                f"data.procedural.classes = {self.procedural.classes}"
            )
        return self

    @property
    def classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return self.procedural.classes if self.source == "procedural" else 1000


# --- procedural scenes ------------------------------------------------------------------------------


def to_pil(img: Float[np.ndarray, "y x 3"]) -> Image.Image:
    return Image.fromarray((img * 255 + 0.5).astype(np.uint8))


# --- sources ----------------------------------------------------------------------------------------


class ImageSource:
    """Images and labels of one split by index; procedural sources render at a requested size."""

    def __init__(self, cfg: VisionDataConfig, split: Literal["train", "validation"], seed: int) -> None:
        self.cfg, self.split, self.seed = cfg, split, seed
        name = cfg.train_split if split == "train" else cfg.val_split
        self._items: Any = None
        if cfg.source == "imagefolder":
            from torchvision.datasets import ImageFolder

            folder = Path(cfg.root or "") / name
            if not folder.is_dir():
                raise FileNotFoundError(f"data.root: ImageFolder split {str(folder)!r} does not exist")
            self._items = ImageFolder(str(folder))
            if len(self._items.classes) > cfg.classes:
                raise ValueError(
                    f"{folder} has {len(self._items.classes)} class folders but data.num_classes = {cfg.classes}"
                )
        elif cfg.source == "hf":
            import datasets

            local = (f"read a local ImageFolder instead (data.source: imagefolder with data.root: DIR holding "
                     f"DIR/{cfg.train_split}/<class>/*.JPEG and DIR/{cfg.val_split}/<class>/*.JPEG; "
                     "data.train_split and data.val_split name those folders, e.g. data.val_split: val)")
            with hub_dataset("data.hf_name", cfg.hf_name, local=local):
                self._items = datasets.load_dataset(cfg.hf_name, split=name)

    def __len__(self) -> int:
        if self.cfg.source == "procedural":
            return self.cfg.procedural.val_size if self.split == "validation" else 2**62
        return len(self._items)

    def item(self, index: int, size: int | None = None) -> tuple[Image.Image, int]:
        """(RGB image, label); ``size`` renders procedural scenes at that many pixels (default 64)."""
        if self.cfg.source == "procedural":
            p = self.cfg.procedural
            scene = make_scene(self.seed, self.split, index, p)
            return to_pil(render(scene, size or 64, noise=p.noise)), scene.label
        if self.cfg.source == "imagefolder":
            img, label = self._items[index]
            return img.convert("RGB"), int(label)
        row = self._items[index]
        return row["image"].convert("RGB"), int(row["label"])


# --- transforms -------------------------------------------------------------------------------------


def eval_resize(size: int) -> int:
    """The paper's pre-crop size for evaluation at S: ``floor(S / (224/256))`` (256 at 224, 768 at 672)."""
    return math.floor(size / EVAL_CROP_PCT)


def eval_transform(size: int) -> Any:
    """timm's evaluation transform of the paper's protocol: resize the short side to 256/224·S
    (bicubic), centre-crop S, normalise."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, size, size),
        is_training=False,
        crop_pct=EVAL_CROP_PCT,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def train_transform(size: int, aug: AugmentSettings) -> Any:
    """timm's training transform (RandomResizedCrop, flip, RandAugment / colour jitter, random erasing)."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, size, size),
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        vflip=0.0,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def make_mixup(aug: AugmentSettings, num_classes: int) -> Any:
    """timm's Mixup/CutMix with label smoothing folded into the soft targets; None when both are off."""
    if not aug.mixing:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode="batch",
        label_smoothing=aug.smoothing,
        num_classes=num_classes,
    )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU RNG (timm's transforms draw from all three), then restore them."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it records a stack trace per call
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def sample_seed(seed: int, index: int, kind: int = 7) -> int:
    """A 32-bit seed for sample ``index`` (kind 7: its augmentation; 13: the batch's Mixup/CutMix)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, kind, index & 0xFFFFFFFF, index >> 32]).generate_state(1)[0])


class TrainBatches:
    """Training batches as a pure function of the global index of their first sample."""

    def __init__(self, cfg: VisionDataConfig, size: int, seed: int) -> None:
        self.cfg, self.size, self.seed = cfg, size, seed
        self.source = ImageSource(cfg, "train", seed)
        self.transform = train_transform(size, cfg.augment)
        self.mixup = make_mixup(cfg.augment, cfg.classes)

    def index(self, g: int) -> int:
        """Data-set index of global sample ``g``: a fresh permutation every epoch (procedural: ``g`` itself)."""
        if self.cfg.source == "procedural":
            return g
        n = len(self.source)
        epoch, offset = divmod(g, n)
        perm = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, 11, epoch])).permutation(n)
        return int(perm[offset])

    def batch(self, first: int, count: int) -> dict[str, Tensor]:
        """Samples ``first … first + count - 1``: ``images`` (b, 3, S, S), ``targets`` (b,) or soft (b, classes)."""
        images, labels = [], []
        for g in range(first, first + count):
            with seeded(sample_seed(self.seed, g)):
                # Procedural scenes are rendered a little larger than S, as a photo is larger than its crop.
                img, label = self.source.item(self.index(g), size=eval_resize(self.size))
                images.append(self.transform(img))
            labels.append(label)
        x = torch.stack(images)  # (b, 3, S, S)
        y = torch.tensor(labels, dtype=torch.int64)
        if self.mixup is not None:
            if count % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch; train.batch_size = {count}")
            with seeded(sample_seed(self.seed, first, kind=13)):
                x, y = self.mixup(x, y)
        return {"images": x, "targets": y}


class _StepBatches(torch.utils.data.Dataset):
    """Item ``j`` = the ``j``-th micro-batch from ``start`` on: lets a DataLoader prepare batches ahead."""

    def __init__(self, batches: TrainBatches, firsts: Sequence[int], count: int) -> None:
        self.batches, self.firsts, self.count = batches, firsts, count

    def __len__(self) -> int:
        return len(self.firsts)

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        return self.batches.batch(self.firsts[j], self.count)


class Prefetcher:
    """Serves ``batch(first, count)`` in call order, computed ``workers`` processes ahead.

    The batches stay a pure function of ``first`` (so resume is exact); an unexpected ``first``
    (a resume, a jump) restarts the look-ahead from there.
    """

    def __init__(self, batches: TrainBatches, workers: int, stride: int, horizon: int = 100_000) -> None:
        self.batches, self.workers, self.stride, self.horizon = batches, workers, stride, horizon
        self._iter: Iterator[dict[str, Tensor]] | None = None
        self._next: int | None = None

    def __call__(self, first: int, count: int) -> dict[str, Tensor]:
        if self.workers == 0:
            return self.batches.batch(first, count)
        if self._iter is None or first != self._next:
            firsts = [first + j * self.stride for j in range(self.horizon)]
            loader = torch.utils.data.DataLoader(
                _StepBatches(self.batches, firsts, count),
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=2,
                persistent_workers=False,
            )
            self._iter = iter(loader)
        self._next = first + self.stride
        return next(self._iter)


# --- evaluation data --------------------------------------------------------------------------------


def eval_images(
    source: ImageSource, size: int, indices: Sequence[int]
) -> tuple[Float[Tensor, "b 3 s s"], Int[Tensor, " b"]]:
    """Images ``indices`` of an evaluation split under the paper's protocol at resolution ``size``.

    Procedural scenes are rendered at 256/224·S (so the resize is exact) and centre-cropped to S.
    """
    tf = eval_transform(size)
    images, labels = [], []
    for i in indices:
        img, label = source.item(int(i), size=eval_resize(size))
        images.append(tf(img))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

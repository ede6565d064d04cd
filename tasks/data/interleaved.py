"""Interleaved text + image data for the hybrid recipe: questions over a run of images.

One example is a question followed by images, each wrapped in two marker words, ``[image]``
before its patches and ``[/image]`` after them. Every image holds one coloured shape in one cell
of a 3 × 3 layout (top/middle/bottom × left/center/right). Three questions (``data.question``);
the first two are about a reference image shown first, the answer being one of the ``K``
candidates after it::

    find the same colour as [image] <reference> [/image] [image] <candidate 1> [/image] ...

* ``colour`` (default): exactly one candidate's shape has the reference's colour; by default
  half of the others copy the reference's shape and cell in another colour. The answer needs
  which image each patch belongs to (the timeline): each candidate is read out at its
  ``[/image]`` word, which must gather its own image's patches and compare them with the
  reference's, the first image.
* ``place`` (``find the same place as ...``): exactly one candidate has its shape in the
  reference's cell; also needs where each patch lies inside its image (local coordinates).
* ``sentence`` (``find red square top left [image] <image 1> [/image] ...``): exactly one image
  shows the described colour, shape and cell.

**Why the readout comes after its image** (:func:`segments`). The markers are identical tokens,
so which image a ``[/image]`` belongs to must follow from positions alone. On the timeline an
image takes three steps: ``[image]`` at ``t``, its patches anchored at ``t + 1``, ``[/image]``
at ``t + 2``, the next ``[image]`` at ``t + 3``. The readout is then one step from its own
image and two or more from any other, so under the hybrid metric ``|Δt| + gap + ‖(r, c)‖``
every patch of its own image is strictly nearer than the same patch of any other image, and in
the flat 1-D index its own patches are the ``P`` nearest (``1 … P``) against ``2 … P + 1`` for
the next image. (A readout before its image, at ``t``, would be exactly as far from the
previous image's patches as from its own: a tie no distance-based encoding can break.)

**Labels.** Besides the answer, every shown image's colour (``colours``): the recipe's
auxiliary label, which each readout can only name by finding its own image's patches.

**Targets** are balanced: example ``i`` has its answer at candidate ``i mod K``, so guessing
by order (e.g. an encoding without positions, whose identical markers score every candidate
alike and whose argmax is then the first) scores exactly the chance level ``1 / K``.

At smoke scale (a few hundred CPU steps) only ``colour`` leaves the chance level; ``place`` and
``sentence`` need far longer training.

Images are resolution-free scenes rendered by the ViT data's renderer, so the same example can
be shown with larger images; the number of candidates ``K`` is chosen per call, so evaluation
can use more images than training. A pure function of ``(seed, split, index, K)``.

Legend: b batch, i images shown, c channels, y/x pixels, n text tokens.
"""

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt
from torch import Tensor

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.scenes import Scene, Shape, render

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
SHAPES: tuple[str, ...] = ("square", "disk")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
IMAGE_WORD = "[image]"
"""The marker before each image."""
IMAGE_END = "[/image]"
"""The marker after each image: where the image is read out (scored)."""
MARKERS_PER_IMAGE = 2
"""Text tokens per image: ``[image]`` and ``[/image]``."""
STEPS_PER_IMAGE = 3
"""Timeline steps per image: ``[image]``, the patches' anchor, ``[/image]``."""
PROMPTS: dict[str, tuple[str, ...]] = {
    "colour": ("find", "the", "same", "colour", "as"),
    "place": ("find", "the", "same", "place", "as"),
}
"""Questions about a reference: the first image is the reference, the answer is among the others."""
VOCAB: tuple[str, ...] = (
    "find", "the", "same", "colour", "place", "as", *COLORS, *SHAPES, *ROWS, *COLS, IMAGE_WORD, IMAGE_END
)
"""The word list; a token id is an index into it."""
SENTENCE_LEN = 5
"""``find <colour> <shape> <row> <col>`` or ``find the same place as``."""
_SPLITS = {"train": 0, "validation": 1}
MEAN, STD = 0.3, 0.25
"""Pixel normalisation of the rendered images (values in [0, 1])."""


class HybridDataConfig(Frozen):
    """The procedural matching examples (``data:`` of a hybrid recipe)."""

    question: Literal["colour", "place", "sentence"] = "colour"
    """colour: which candidate's shape has the colour of the first (reference) image's; place:
    which has its shape in the reference's cell; sentence: which shows the described shape."""
    hard_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of non-matching images that show the sentence's colour and shape in another cell."""
    radius: tuple[float, float] = (0.1, 0.13)
    """Range of the shape's radius, in image widths."""
    jitter: float = Field(0.05, ge=0.0, le=0.1)
    """Largest offset of a shape from its cell's centre, in image widths."""
    noise: float = Field(0.03, ge=0.0, le=0.5)
    """Std of per-pixel noise (drawn per image and size)."""
    val_size: PositiveInt = 1024
    """Examples in the validation split (also the evaluation split)."""


@dataclass(frozen=True)
class Description:
    color: str
    shape: str
    row: int
    col: int

    def words(self) -> list[str]:
        return ["find", self.color, self.shape, ROWS[self.row], COLS[self.col]]


@dataclass(frozen=True)
class Example:
    """A question, resolution-free images and the index of the answer among the candidates.

    ``sentence``: the words before the images. ``images``: all images in sequence order; with a
    question about a reference the first is the reference and the candidates are the rest.
    """

    words: tuple[str, ...]
    images: tuple[Scene, ...]
    target: int
    descriptions: tuple[Description, ...]


def _rng(seed: int, split: str, index: int, num_images: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"hybrid split {split!r} is unknown; allowed: {sorted(_SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 31, _SPLITS[split], index, num_images]))


def _random_description(rng: np.random.Generator) -> Description:
    colors = tuple(COLORS)
    return Description(
        colors[int(rng.integers(len(colors)))],
        SHAPES[int(rng.integers(len(SHAPES)))],
        int(rng.integers(3)),
        int(rng.integers(3)),
    )


def _scene(desc: Description, rng: np.random.Generator, cfg: HybridDataConfig) -> Scene:
    cx = (desc.col + 0.5) / 3 + rng.uniform(-cfg.jitter, cfg.jitter)
    cy = (desc.row + 0.5) / 3 + rng.uniform(-cfg.jitter, cfg.jitter)
    shape = Shape(desc.shape, float(cx), float(cy), float(rng.uniform(*cfg.radius)), COLORS[desc.color])  # type: ignore[arg-type]
    dark = tuple(float(v) for v in rng.uniform(0.0, 0.2, size=3))
    light = tuple(float(v) for v in rng.uniform(0.2, 0.4, size=3))
    return Scene(0, (shape,), (dark, light), float(rng.uniform(0, 2 * math.pi)), int(rng.integers(2**31)))  # type: ignore[arg-type]


def make_example(seed: int, split: str, index: int, num_images: int, cfg: HybridDataConfig) -> Example:
    """Example ``index`` of ``split`` with ``num_images`` candidate images: a pure function of its arguments."""
    if num_images < 1:
        raise ValueError(f"num_images = {num_images} must be at least 1")
    rng = _rng(seed, split, index, num_images)
    wanted = _random_description(rng)
    target = index % num_images  # balanced: no candidate slot is likelier than another
    descs = []
    for j in range(num_images):
        desc = wanted
        if j != target:
            while _matches(desc, wanted, cfg.question):
                hard = rng.uniform() < cfg.hard_fraction
                if cfg.question == "colour":  # another colour; hard: the reference's shape and cell
                    other = _random_description(rng)
                    desc = Description(other.color, wanted.shape, wanted.row, wanted.col) if hard else other
                elif hard:  # same look, another cell
                    desc = Description(wanted.color, wanted.shape, int(rng.integers(3)), int(rng.integers(3)))
                else:
                    desc = _random_description(rng)
        elif cfg.question != "sentence":  # the answer shares only what the question asks about
            other = _random_description(rng)
            desc = (
                Description(wanted.color, other.shape, other.row, other.col)
                if cfg.question == "colour"
                else Description(other.color, other.shape, wanted.row, wanted.col)
                if rng.uniform() >= cfg.hard_fraction
                else wanted
            )
        descs.append(desc)
    if cfg.question == "sentence":
        words = tuple(wanted.words())
    else:
        descs.insert(0, wanted)
        words = PROMPTS[cfg.question]
    return Example(words, tuple(_scene(d, rng, cfg) for d in descs), target, tuple(descs))


def _matches(desc: Description, wanted: Description, question: str) -> bool:
    if question == "colour":
        return desc.color == wanted.color
    if question == "place":
        return (desc.row, desc.col) == (wanted.row, wanted.col)
    return desc == wanted


def tokenize(words: list[str]) -> list[int]:
    """Word ids; unknown words name the vocabulary."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    bad = [w for w in words if w not in ids]
    if bad:
        raise ValueError(f"words {bad} are not in the vocabulary {list(VOCAB)}")
    return [ids[w] for w in words]


def example_batch(
    cfg: HybridDataConfig, seed: int, split: str, indices: range | list[int], num_images: int, size: int
) -> dict[str, Tensor]:
    """``text`` (b, 5 + 2I) ids in sequence order (question, then ``[image] [/image]`` per image),
    ``images`` (b, I, 3, size, size) normalised (I = K, or K + 1 with the reference first), ``targets`` (b,),
    ``colours`` (b, I) the index in :data:`COLORS` of each shown image's shape."""
    examples = [make_example(seed, split, int(i), num_images, cfg) for i in indices]
    shown = len(examples[0].images)
    text = torch.tensor(
        [tokenize([*e.words, *[IMAGE_WORD, IMAGE_END] * shown]) for e in examples], dtype=torch.int64
    )
    pixels = np.stack(
        [np.stack([render(s, size, noise=cfg.noise) for s in e.images]) for e in examples]
    )  # (b, k, y, x, 3)
    images = (torch.from_numpy(pixels).permute(0, 1, 4, 2, 3) - MEAN) / STD  # (b, k, 3, y, x)
    colors = list(COLORS)
    return {
        "text": text,
        "images": images.contiguous(),
        "targets": torch.tensor([e.target for e in examples], dtype=torch.int64),
        "colours": torch.tensor([[colors.index(d.color) for d in e.descriptions] for e in examples], dtype=torch.int64),
    }


def segments(num_images: int, grid: tuple[int, int]) -> list[tuple[str, int | tuple[int, int]]]:
    """The interleaved layout: ``text:5`` then ``text:1, image:HxW, text:1`` per image (for ``HybridSpace.layout``)."""
    out: list[tuple[str, int | tuple[int, int]]] = [("text", SENTENCE_LEN)]
    for _ in range(num_images):
        out += [("text", 1), ("image", grid), ("text", 1)]
    return out


def timeline_length(num_images: int) -> int:
    """Timeline steps of a sequence with ``num_images`` images shown: the question, then 3 per image."""
    return SENTENCE_LEN + STEPS_PER_IMAGE * num_images


def check_batch(text: Int[Tensor, "b n"], images: Float[Tensor, "b i c y x"]) -> None:
    """Text and images agree: ``[image]`` and ``[/image]`` per image after the sentence."""
    want = SENTENCE_LEN + MARKERS_PER_IMAGE * images.shape[1]
    if text.shape[1] != want:
        raise ValueError(f"text has {text.shape[1]} tokens, expected {SENTENCE_LEN} + two per image = {want}")

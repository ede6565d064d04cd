"""Procedural video clips for the video recipe: which shape comes first, and on which side?

A clip is a resolution- and frame-rate-free description: a red and a blue shape, one shown
during the first part of the clip and the other during the rest, at different horizontal
places, plus grey shapes that stay all clip long. The class is (which colour comes first) ×
(whether the first shape is left or right of the second): four classes. It is rendered with the
ViT data's anti-aliased renderer at any number of frames (frame ``f`` of ``F`` shows time
``f / (F - 1)``: more frames = the same clip at a higher frame rate) and any size (larger
frames = the same clip at a higher resolution), so one clip can be shown at the training
``T × R`` and at ``2T × R`` or ``T × 2R``.

The label needs time and space together: the same two shapes at the same places in reverse
order, or in the same order mirrored, are other classes. With one frame per tubelet and a flat
background a model without positions (NoPE) sees every class as the same bag of patches (25 %);
time alone or space alone gets at most 50 %. Everything is a pure function of ``(seed, split, index)``.

Legend: b batch, c channels, f frames, y/x pixels.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from pydantic import Field, PositiveInt
from torch import Tensor

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.scenes import Scene, Shape, render

CLASSES: tuple[str, ...] = (
    "red first, on the left",
    "red first, on the right",
    "blue first, on the left",
    "blue first, on the right",
)
"""Class names: the colour shown first, and its side relative to the second shape."""
RED, BLUE = (0.95, 0.15, 0.1), (0.15, 0.35, 0.95)
_SPLITS = {"train": 0, "validation": 1}
MEAN, STD = 0.3, 0.25
"""Pixel normalisation of the rendered clips (values in [0, 1])."""


class VideoDataConfig(Frozen):
    """The procedural clips (``data:`` of a video recipe)."""

    distractors: int = Field(1, ge=0, le=4)
    """Grey shapes, shown all clip long, that carry no label information."""
    switch: tuple[float, float] = (0.35, 0.65)
    """Range of the time (fraction of the clip) at which the first shape gives way to the second."""
    columns: PositiveInt = Field(3, ge=2)
    """The two coloured shapes sit at the centres of two different of this many columns (the
    training patch columns, R / patch_size): a shape's place inside its patch is then the same
    on either side, so the patch contents never tell NoPE which shape is left (free positions
    leaked it through sub-patch offsets: 41 % instead of 25 %)."""
    radius: tuple[float, float] = (0.1, 0.14)
    """Range of the coloured shapes' radius, in frame widths."""
    noise: float = Field(0.03, ge=0.0, le=0.5)
    """Std of per-pixel noise (drawn per frame and size, so it is not part of the clip)."""
    val_size: PositiveInt = 256
    """Clips in the validation split (also the evaluation split)."""


@dataclass(frozen=True)
class Clip:
    """A clip in unit coordinates: the shape shown first, the one shown second, when they switch."""

    label: int
    first: Shape
    second: Shape
    switch: float
    statics: tuple[Shape, ...]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    gradient_angle: float
    noise_seed: int

    def scene(self, u: float) -> Scene:
        """The still scene at time ``u`` ∈ [0, 1] of the clip."""
        shown = self.first if u < self.switch else self.second
        return Scene(self.label, (*self.statics, shown), self.background, self.gradient_angle, self.noise_seed)


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"video split {split!r} is unknown; allowed: {sorted(_SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 29, _SPLITS[split], index]))


def make_clip(seed: int, split: str, index: int, cfg: VideoDataConfig) -> Clip:
    """Clip ``index`` of ``split``: a pure function of its arguments."""
    rng = clip_rng(seed, split, index)
    label = int(rng.integers(len(CLASSES)))
    red_first, first_left = label < 2, label % 2 == 0
    kinds = ("disk", "square")
    r1, r2 = (float(v) for v in rng.uniform(*cfg.radius, size=2))
    margin = max(r1, r2) + 0.03
    cols = sorted(int(c) for c in rng.choice(cfg.columns, size=2, replace=False))
    left, right = ((c + 0.5) / cfg.columns for c in cols)
    xs = (left, right) if first_left else (right, left)
    ys = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    colors = (RED, BLUE) if red_first else (BLUE, RED)
    first, second = (Shape(kinds[int(rng.integers(2))], x, y, r, c) for x, y, r, c in zip(xs, ys, (r1, r2), colors))
    statics: list[Shape] = []
    for _ in range(cfg.distractors):
        for _ in range(100):
            c, rs = rng.uniform(0.1, 0.9, size=2), float(rng.uniform(0.05, 0.08))
            if all(math.hypot(c[0] - s.cx, c[1] - s.cy) > s.r + rs + 0.02 for s in (first, second, *statics)):
                g = float(rng.uniform(0.45, 0.75))
                statics.append(Shape(kinds[int(rng.integers(2))], float(c[0]), float(c[1]), rs, (g, g, g)))
                break
    # A flat background: a gradient would tell each patch where it lies (a position leak for NoPE).
    back = tuple(float(v) for v in rng.uniform(0.0, 0.3, size=3))
    return Clip(
        label,
        first,
        second,
        float(rng.uniform(*cfg.switch)),
        tuple(statics),
        (back, back),  # type: ignore[arg-type]
        float(rng.uniform(0, 2 * math.pi)),
        int(rng.integers(2**31)),
    )


def render_clip(clip: Clip, frames: int, size: int, *, noise: float = 0.03) -> Float[np.ndarray, "f y x 3"]:
    """``frames`` frames of ``size × size`` pixels, values in [0, 1]; frame ``f`` shows time ``f / (frames - 1)``."""
    if frames < 1 or size < 1:
        raise ValueError(f"a clip needs at least one frame of at least one pixel, got frames = {frames}, size = {size}")
    out = []
    for f in range(frames):
        u = f / (frames - 1) if frames > 1 else 0.5
        scene = clip.scene(u)
        scene = Scene(
            scene.label, scene.shapes, scene.background, scene.gradient_angle, (clip.noise_seed + 7919 * f) % 2**31
        )
        out.append(render(scene, size, noise=noise))
    return np.stack(out)


def clip_batch(
    cfg: VideoDataConfig, seed: int, split: str, indices: range | list[int], frames: int, size: int
) -> tuple[Float[Tensor, "b 3 f y x"], Int[Tensor, " b"]]:
    """Normalised clips ``(b, 3, frames, size, size)`` and their labels."""
    clips = [make_clip(seed, split, int(i), cfg) for i in indices]
    video = np.stack([render_clip(c, frames, size, noise=cfg.noise) for c in clips])  # (b, f, y, x, 3)
    x = (torch.from_numpy(video).permute(0, 4, 1, 2, 3) - MEAN) / STD  # (b, 3, f, y, x)
    return x.contiguous(), torch.tensor([c.label for c in clips], dtype=torch.int64)

"""Procedural scenes: one red and one blue shape (plus grey distractors) whose class is where the red
one lies relative to the blue one, so only positions tell the classes apart.

A scene is a resolution-free description (centres and radii in the unit square), rendered
anti-aliased at any size, so the same scene can be shown at the training resolution R and at 3R.
Everything is a pure function of ``(seed, split, index)``. The image, video and interleaved data
all draw their pictures from here.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float
from pydantic import Field, PositiveInt

from seqpe_nd.positions import Frozen

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
"""Procedural classes: where the red shape lies relative to the blue one."""


class ProceduralSettings(Frozen):
    """The embedded procedural data set (``data.procedural``)."""

    classes: Literal[2, 4] = 4
    """2: red left/right of blue; 4: also above/below."""
    distractors: int = Field(2, ge=0, le=6)
    """Grey shapes that carry no label information."""
    val_size: PositiveInt = 512
    """Scenes in the validation split (the evaluation split too)."""
    noise: float = Field(0.04, ge=0.0, le=0.5)
    """Std of per-pixel noise (drawn per rendered size, so it is not part of the scene)."""


@dataclass(frozen=True)
class Shape:
    kind: Literal["disk", "square"]
    cx: float
    cy: float
    r: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """A resolution-free scene: shapes in the unit square (x right, y down) and a background."""

    label: int
    shapes: tuple[Shape, ...]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    gradient_angle: float
    noise_seed: int


_SPLITS = {"train": 0, "validation": 1}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"procedural split {split!r} is unknown; allowed: {sorted(_SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, _SPLITS[split], index]))


def make_scene(seed: int, split: str, index: int, settings: ProceduralSettings) -> Scene:
    """Scene ``index`` of ``split``: a pure function of its arguments.

    The red centre and the blue centre differ by a vector within ±25° of the class's axis, and
    every shape stays inside the central 80% of the image, so the evaluation centre crop
    (87.5%) never cuts the label away.
    """
    rng = scene_rng(seed, split, index)
    label = int(rng.integers(settings.classes))
    axis = {0: math.pi, 1: 0.0, 2: -math.pi / 2, 3: math.pi / 2}[label]  # red minus blue direction (y down)
    lo, hi = 0.2, 0.8
    for _ in range(1000):
        r_red, r_blue = rng.uniform(0.07, 0.11, size=2)
        blue = rng.uniform(lo, hi, size=2)
        angle = axis + rng.uniform(-1, 1) * math.radians(25)
        dist = rng.uniform(0.3, 0.5)
        red = blue + dist * np.array([math.cos(angle), math.sin(angle)])
        if (lo <= red).all() and (red <= hi).all():
            break
    else:  # pragma: no cover - the acceptance rate is far above 1/1000
        raise RuntimeError("could not place the scene's shapes")
    red_color = (rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.2))
    blue_color = (rng.uniform(0.0, 0.2), rng.uniform(0.1, 0.35), rng.uniform(0.75, 1.0))
    kinds = ("disk", "square")
    shapes = [
        Shape(kinds[int(rng.integers(2))], float(red[0]), float(red[1]), float(r_red), red_color),
        Shape(kinds[int(rng.integers(2))], float(blue[0]), float(blue[1]), float(r_blue), blue_color),
    ]
    for _ in range(settings.distractors):
        for _ in range(100):
            c, r = rng.uniform(0.12, 0.88, size=2), rng.uniform(0.03, 0.06)
            if all(math.hypot(c[0] - s.cx, c[1] - s.cy) > s.r + r + 0.03 for s in shapes):
                g = rng.uniform(0.35, 0.65)
                shapes.append(Shape(kinds[int(rng.integers(2))], float(c[0]), float(c[1]), float(r), (g, g, g)))
                break
    dark = tuple(float(v) for v in rng.uniform(0.05, 0.3, size=3))
    light = tuple(float(v) for v in rng.uniform(0.3, 0.55, size=3))
    angle = float(rng.uniform(0, 2 * math.pi))
    return Scene(label, tuple(shapes), (dark, light), angle, int(rng.integers(2**31)))  # type: ignore[arg-type]


def render(scene: Scene, size: int | Sequence[int], *, noise: float = 0.04) -> Float[np.ndarray, "y x 3"]:
    """The scene at ``size`` = S or (height, width) pixels, anti-aliased, float32 values in [0, 1]."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"render size must be positive, got {(h, w)}")
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]  # (y, 1)
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]  # (1, x)
    t = np.clip((x - 0.5) * math.cos(scene.gradient_angle) + (y - 0.5) * math.sin(scene.gradient_angle) + 0.5, 0, 1)
    dark, light = np.array(scene.background[0], np.float32), np.array(scene.background[1], np.float32)
    img = dark + (light - dark) * t[..., None]  # (y, x, 3)
    pixel = 1.0 / min(h, w)  # one pixel in unit coordinates: the anti-aliasing ramp
    for s in scene.shapes:
        dx, dy = x - s.cx, y - s.cy
        sdf = np.sqrt(dx * dx + dy * dy) - s.r if s.kind == "disk" else np.maximum(np.abs(dx), np.abs(dy)) - s.r * 0.9
        alpha = np.clip(0.5 - sdf / pixel, 0, 1)[..., None]  # coverage of each pixel
        img = img * (1 - alpha) + np.array(s.color, np.float32) * alpha
    if noise > 0:
        rng = np.random.default_rng([scene.noise_seed, h, w])
        img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1)

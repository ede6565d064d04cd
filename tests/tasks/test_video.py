"""The video recipe: a YAML-only 3-D space, seeded clips, every method at more and larger frames, a tiny run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seqpe_nd.tasks.engine.evaluation import EVAL_JSON
from seqpe_nd.positions import GridSpace, load_space
from seqpe_nd.tasks.recipes import video
from seqpe_nd.tasks.recipes import get_recipe, load_config
from seqpe_nd.tasks.engine.trainer import train
from seqpe_nd.tasks.data.video import VideoDataConfig, clip_batch, make_clip, render_clip

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "video"
SMOKE = sorted((CONFIGS / "smoke").glob("*.yaml"))
METHODS = ("nope", "ape_sin", "ape_learn", "rope_axial", "seqpe")


def tiny_config(pe: dict, **train: object) -> dict:
    """Clips small enough to learn on a shared CPU in seconds (3 × 2 × 2 tokens of 8 px)."""
    return {
        "task": "video",
        "model": {
            "img_size": 16,
            "frames": 3,
            "patch_size": 8,
            "tubelet": 1,
            "embed_dim": 48,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
        },
        "data": {"distractors": 0, "columns": 2, "val_size": 128},
        "space": {
            "kind": "grid",
            "L": [3, 2, 2],
            "L_max": [12, 12, 12],
            "contrastive": {"batch": 4, "num_candidates": 8, "local_window": [3, 3, 3]},
            "ood": {"num_starts": 4, "num_teachers": 8},
        },
        "pe": pe,
        "train": {
            "steps": 150,
            "batch_size": 32,
            "lr": 3.0e-3,
            "warmup_steps": 10,
            "schedule": "cosine",
            "log_every": 50,
            "seed": 0,
            **train,
        },
        "eval": {"sizes": [[3, 16], [6, 16], [3, 32]], "batch_size": 128, "val_clips": 128},
    }


SEQPE = {
    "method": "seqpe",
    "integration": "attn_mul",
    "per_layer": True,
    "hidden": 32,
    "layers": 1,
    "heads": 2,
    "dropout": 0.0,
    "init": "trunc_normal",
}
PE = {m: ({"method": m} if m != "seqpe" else SEQPE) for m in METHODS}


def test_space_is_defined_by_yaml_alone() -> None:
    for path in SMOKE:
        config = load_config(path)
        space = load_space(yaml.safe_load(path.read_text())["space"])
        assert isinstance(space, GridSpace) and space.ndim == 3
        task = get_recipe("video").build_task(config, Path("unused"))
        assert task.space.model_dump() == space.model_dump() and tuple(space.L) == task.cfg.model.grid


def test_smoke_configs_cover_every_method_and_differ_only_in_it() -> None:
    configs = {p.stem: load_config(p) for p in SMOKE}
    assert {c.pe.method for c in configs.values()} == set(METHODS)
    ref = configs["seqpe"]
    for name, c in configs.items():
        for section in ("model", "data", "space", "train", "eval"):
            assert getattr(c, section) == getattr(ref, section), f"{name}.yaml differs from seqpe.yaml in {section}"


def test_clips_are_deterministic_under_a_seed() -> None:
    cfg = VideoDataConfig(distractors=2)
    a, b = make_clip(3, "train", 17, cfg), make_clip(3, "train", 17, cfg)
    assert a == b
    np.testing.assert_array_equal(render_clip(a, 5, 24), render_clip(b, 5, 24))
    assert make_clip(3, "train", 18, cfg) != a and make_clip(4, "train", 17, cfg) != a
    assert make_clip(3, "validation", 17, cfg) != a
    x1, y1 = clip_batch(cfg, 0, "validation", range(6), 4, 16)
    x2, y2 = clip_batch(cfg, 0, "validation", range(6), 4, 16)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    assert torch.equal(y1, y2)


def test_clips_render_at_any_frames_and_size() -> None:
    clip = make_clip(0, "validation", 0, VideoDataConfig(noise=0.0))
    for frames, size in [(1, 8), (4, 16), (9, 40)]:
        assert render_clip(clip, frames, size).shape == (frames, size, size, 3)
    # More frames = the same clip at a higher frame rate: frames at the same time agree.
    short, long = render_clip(clip, 3, 32, noise=0.0), render_clip(clip, 7, 32, noise=0.0)
    for f in range(3):
        np.testing.assert_allclose(short[f], long[3 * f], atol=1e-6)


def test_label_needs_time_and_space() -> None:
    """The class is (colour shown first) x (side of the first shape): reversing time or mirroring
    the clip gives the same bag of shapes with another label."""
    cfg = VideoDataConfig(noise=0.0, distractors=0)
    labels = set()
    for i in range(40):
        clip = make_clip(0, "train", i, cfg)
        labels.add(clip.label)
        frames = render_clip(clip, 6, 24)
        red = (frames[..., 0] > 0.8) & (frames[..., 2] < 0.3)  # (f, y, x)
        blue = (frames[..., 2] > 0.8) & (frames[..., 0] < 0.3)
        first_frame_red = bool(red[0].any())
        assert first_frame_red == (clip.label < 2) and bool(blue[0].any()) != first_frame_red
        assert bool(red[-1].any()) != first_frame_red  # the other colour at the end
        x_first = np.nonzero((red if first_frame_red else blue)[0])[1].mean()
        x_second = np.nonzero((blue if first_frame_red else red)[-1])[1].mean()
        assert (x_first < x_second) == (clip.label % 2 == 0)
    assert labels == {0, 1, 2, 3}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_more_and_larger_frames(method: str) -> None:
    task = video.VideoRecipe.build_task(video.VideoConfig.parse(tiny_config(PE[method])), Path("unused"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        for frames, size in [(3, 16), (9, 16), (3, 40), (6, 32)]:
            x, _ = clip_batch(task.cfg.data, 0, "validation", range(2), frames, size)
            out = model(x)
            assert out.logits.shape == (2, 4) and torch.isfinite(out.logits).all()


def test_space_must_match_the_token_grid() -> None:
    cfg = tiny_config({"method": "nope"})
    cfg["space"]["L"] = [4, 2, 2]
    with pytest.raises(ValueError, match=r"space.L = \[4, 2, 2\] must be the training token grid \[3, 2, 2\]"):
        video.VideoRecipe.build_task(video.VideoConfig.parse(cfg), Path("unused"))
    cfg = tiny_config({"method": "nope"})
    cfg["space"] = {"L": [2, 2], "L_max": [10, 10]}
    with pytest.raises(ValueError, match="needs a 3-D grid space"):
        video.VideoRecipe.build_task(video.VideoConfig.parse(cfg), Path("unused"))


@pytest.mark.slow
def test_tiny_run_beats_chance_and_evaluates_larger_clips(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CPU: one thread is faster than two contended ones
    try:
        task = video.VideoRecipe.build_task(video.VideoConfig.parse(tiny_config({"method": "ape_sin"})), tmp_path)
        result = train(task, task.cfg.train, tmp_path)
        assert result["val/top1"] > 60.0, result  # chance: 25 %
        out = video.VideoRecipe.evaluate(tmp_path, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert set(out["sizes"]) == {"3x16", "6x16", "3x32"}
    assert out["sizes"]["3x32"]["grid"] == [3, 4, 4]
    assert (tmp_path / EVAL_JSON).is_file()

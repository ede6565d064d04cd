"""The ViT recipe: data (procedural and ImageFolder), timm transforms, configs, train + evaluate."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seqpe_nd.tasks.cli import main as cli_main
from seqpe_nd.tasks.recipes import get_recipe, load_config
from seqpe_nd.tasks.engine.trainer import TrainConfig, train
from seqpe_nd.tasks.data.vision import (
    AugmentSettings,
    ImageSource,
    TrainBatches,
    VisionDataConfig,
    eval_images,
    eval_resize,
    eval_transform,
)
from seqpe_nd.tasks.data.scenes import ProceduralSettings, make_scene, render
from seqpe_nd.tasks.recipes.vit import ViTConfig, ViTRecipe, default_resolutions

parse_config = ViTConfig.parse
evaluate = ViTRecipe.evaluate


def build_task(config: dict, run_dir: Path) -> ViTRecipe:
    return ViTRecipe.build_task(ViTConfig.parse(config), run_dir)

REPO = Path(__file__).resolve().parents[2]
SPACE = {
    "kind": "grid",
    "L": [4, 4],
    "L_max": [28, 28],
    "contrastive": {"batch": 4, "num_candidates": 8},
    "ood": {"num_starts": 2, "num_teachers": 4},
    "shift": {"prob": 0.5},
}


def tiny_config(pe: dict, **train: object) -> dict:
    return {
        "task": "vit",
        "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        "data": {
            "source": "procedural",
            "procedural": {"classes": 2, "distractors": 0, "val_size": 64},
            "augment": {"scale": [0.9, 1.0], "ratio": [0.95, 1.05], "hflip": 0.0},
        },
        "space": SPACE,
        "pe": pe,
        "random_shift": pe["method"] == "seqpe",
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "seed": 0, **train},
        "eval": {"batch_size": 32, "val_images": 16},
    }


# --- data ---------------------------------------------------------------------------------------------


def test_procedural_scenes_are_deterministic_and_labelled_by_arrangement() -> None:
    p = ProceduralSettings(classes=4)
    for i in range(40):
        a, b = make_scene(3, "train", i, p), make_scene(3, "train", i, p)
        assert a == b
        red, blue = a.shapes[0], a.shapes[1]
        dx, dy = red.cx - blue.cx, red.cy - blue.cy  # y points down
        want = (0 if dx < 0 else 1) if abs(dx) > abs(dy) else (2 if dy < 0 else 3)
        assert a.label == want
        for s in a.shapes:  # inside the central region the evaluation crop keeps
            assert 0.0625 < s.cx - s.r and s.cx + s.r < 0.9375 and 0.0625 < s.cy - s.r and s.cy + s.r < 0.9375
    assert make_scene(3, "train", 0, p) != make_scene(3, "validation", 0, p)
    labels = [make_scene(0, "train", i, p).label for i in range(400)]
    assert set(labels) == {0, 1, 2, 3}


def test_same_scene_renders_at_any_resolution() -> None:
    scene = make_scene(0, "validation", 5, ProceduralSettings(noise=0.0))
    small, big = render(scene, 32, noise=0.0), render(scene, 96, noise=0.0)
    assert small.shape == (32, 32, 3) and big.shape == (96, 96, 3) and render(scene, (24, 40)).shape == (24, 40, 3)
    down = big.reshape(32, 3, 32, 3, 3).mean(axis=(1, 3))  # box-downsampled 96 -> 32
    assert np.abs(down - small).mean() < 0.03


def test_eval_transform_is_resize_256_over_224_then_centre_crop() -> None:
    assert [eval_resize(s) for s in (224, 448, 672)] == [256, 512, 768]
    for s in (32, 48, 224):
        x = eval_transform(s)(Image.new("RGB", (300, 200)))
        assert x.shape == (3, s, s)
    src = ImageSource(VisionDataConfig(), "validation", 0)
    x, y = eval_images(src, 40, [0, 1, 2])
    assert x.shape == (3, 3, 40, 40) and y.shape == (3,)


def test_train_batches_are_pure_functions_of_the_sample_index() -> None:
    cfg = VisionDataConfig(augment=AugmentSettings(hflip=0.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    batches = TrainBatches(cfg, 16, seed=0)
    a, b = batches.batch(8, 4), batches.batch(8, 4)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["images"], batches.batch(12, 4)["images"])
    assert a["images"].shape == (4, 3, 16, 16)


def test_deit_augmentation_gives_soft_mixed_targets() -> None:
    aug = AugmentSettings(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)
    out = TrainBatches(VisionDataConfig(augment=aug), 16, seed=0).batch(0, 4)
    assert out["targets"].shape == (4, 4)
    torch.testing.assert_close(out["targets"].sum(-1), torch.ones(4))
    assert out["targets"].min() > 0  # label smoothing
    with pytest.raises(ValueError, match="even batch"):
        TrainBatches(VisionDataConfig(augment=aug), 16, seed=0).batch(0, 3)


def test_imagefolder_loader_on_local_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    cfg = VisionDataConfig(source="imagefolder", root=str(tmp_path), val_split="val", num_classes=2)
    out = TrainBatches(cfg, 16, seed=0).batch(0, 8)  # 8 > 6 images: the next epoch's permutation continues
    assert out["images"].shape == (8, 3, 16, 16) and set(out["targets"].tolist()) <= {0, 1}
    val = ImageSource(cfg, "validation", 0)
    x, y = eval_images(val, 24, range(len(val)))
    assert x.shape == (6, 3, 24, 24) and y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="data.root is required"):
        VisionDataConfig(source="imagefolder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageSource(VisionDataConfig(source="imagefolder", root=str(tmp_path / "nope")), "train", 0)


# --- configs ------------------------------------------------------------------------------------------

VIT_CONFIGS = sorted((REPO / "configs" / "vit").rglob("*.yaml"))


def test_vit_configs_exist_for_every_method() -> None:
    names = {p.stem for p in (REPO / "configs" / "vit" / "smoke").glob("*.yaml")}
    assert {
        "nope",
        "ape_sin",
        "ape_learn",
        "rope_axial",
        "rope_mixed",
        "seqpe_attn_mul",
        "seqpe_attn_sum",
        "seqpe_attn_bias",
    } <= names
    assert (REPO / "configs" / "vit" / "paper" / "seqpe_attn_mul.yaml").is_file()


@pytest.mark.parametrize("path", VIT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_vit_config_validates_and_builds(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.task == "vit" and isinstance(cfg, ViTConfig) and get_recipe("vit") is ViTRecipe
    task = ViTRecipe.build_task(cfg, Path("unused"))
    assert task.space.L == (cfg.model.img_size // cfg.model.patch_size,) * 2


def test_paper_config_is_the_deit_recipe() -> None:
    cfg = load_config(REPO / "configs" / "vit" / "paper" / "seqpe_attn_mul.yaml")
    t, aug = cfg.train, cfg.data.augment
    assert cfg.model.name == "vit_small_patch16_224" and cfg.model.img_size == 224
    assert t.lr == 1.2e-3 and t.weight_decay == 0.05 and t.schedule == "cosine"
    steps_per_epoch = math.ceil(1_281_167 / 1024)
    assert t.steps == 400 * steps_per_epoch and t.warmup_steps == 20 * steps_per_epoch
    assert aug.smoothing == 0.1 and aug.mixup == 0.8 and aug.cutmix == 1.0 and aug.re_prob == 0.25
    assert aug.auto_augment is not None and aug.auto_augment.startswith("rand-m9")
    assert (
        cfg.pe.method == "seqpe"
        and cfg.pe.integration == "attn_mul"
        and cfg.pe.per_layer
        and cfg.pe.alpha == cfg.pe.beta == 0.1
    )
    assert cfg.eval.resolutions == [224, 320, 384, 448, 512, 640, 672]


@pytest.mark.parametrize("name", ["nope", "ape_sin", "ape_learn", "rope_axial", "rope_mixed", "seqpe_attn_mul",
                                  "seqpe_attn_sum", "seqpe_attn_bias"])
def test_paper_configs_clip_and_drop_path_as_released(name: str) -> None:
    """image main.py clips every model at TRAIN.CLIP_GRAD = 5 and the SeqPE encoder apart at PE_CLIP_GRAD = 5;
    runs/ours_vit.sh trains SeqPE's ViT-S with drop_path 0 (the baselines keep DeiT's 0.1)."""
    cfg = load_config(REPO / "configs" / "vit" / "paper" / f"{name}.yaml")
    assert cfg.train.clip_grad == 5.0
    seqpe = name.startswith("seqpe")
    assert cfg.train.clip_grad_pe == (5.0 if seqpe else None)
    assert cfg.model.drop_path_rate == (0.0 if seqpe else 0.1)
    if seqpe:
        assert cfg.space.shift.starts == 32 and cfg.space.shift.pool == 320  # 32 shifted grids a shifted step


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model.img_szie"):
        parse_config({"task": "vit", "model": {"img_szie": 32}})
    with pytest.raises(ValueError, match="name = 'vit_small_patch16_224' fixes the architecture, so depth, embed_dim"):
        parse_config({"task": "vit", "model": {"name": "vit_small_patch16_224", "embed_dim": 192, "depth": 4}})
    bad = tiny_config({"method": "rope_axial"})
    bad["model"]["img_size"] = 24
    with pytest.raises(ValueError, match=r"space.L = \[4, 4\] must be the training patch grid \[6, 6\]"):
        build_task(bad, Path("unused"))
    assert default_resolutions(224, 16) == [224, 320, 384, 448, 512, 640, 672]
    assert default_resolutions(24, 4) == [24, 36, 40, 48, 56, 68, 72]


# --- train + evaluate ---------------------------------------------------------------------------------


def test_train_and_evaluate_end_to_end(tmp_path: Path) -> None:
    config = tiny_config(
        {
            "method": "seqpe",
            "integration": "attn_mul",
            "per_layer": True,
            "hidden": 32,
            "layers": 1,
            "heads": 2,
            "dropout": 0.0,
            "init": "trunc_normal",
        },
        steps=3,
        save_every=2,
    )
    run = tmp_path / "seqpe"
    res = train(build_task(config, run), TrainConfig(**config["train"]), run)
    assert res["step"] == 3 and "val/top1" in res and "train/pe_aux_loss" in res
    out = evaluate(run, resolutions=[16, 24, 32], max_images=8, quiet=True)
    assert list(out["resolutions"]) == ["16", "24", "32"] and out["resolutions"]["32"]["grid"] == 8
    saved = json.loads((run / "eval.json").read_text())
    assert saved["resolutions"]["24"]["images"] == 8
    assert (run / "eval.png").stat().st_size > 0 and (run / "pe_similarity.png").stat().st_size > 0
    other = tmp_path / "rope"
    cfg2 = tiny_config({"method": "rope_axial"}, steps=1)
    train(build_task(cfg2, other), TrainConfig(**cfg2["train"]), other)
    evaluate(other, resolutions=[16, 24], max_images=8, quiet=True)
    assert not (other / "pe_similarity.png").exists()
    both = {d.name: json.loads((d / "eval.json").read_text()) for d in (run, other)}
    ViTRecipe.plot_runs(both, tmp_path / "both.png", title="both")
    assert (tmp_path / "both.png").stat().st_size > 0
    argv = ["eval", str(run), str(other), "--resolutions", "16", "20", "--max-images", "4", "--out", str(tmp_path / "cmp")]
    assert cli_main(argv) == 0  # seqpe-nd eval RUN RUN --resolutions ...
    # merged into the earlier result (same weights): 20 added, 16 re-measured, 24 and 32 kept
    saved = json.loads((run / "eval.json").read_text())["resolutions"]
    assert list(saved) == ["16", "20", "24", "32"] and saved["16"]["images"] == 4 and saved["24"]["images"] == 8
    assert {"compare.json", "compare.md", "compare.png"} <= {p.name for p in (tmp_path / "cmp").iterdir()}
    with pytest.raises(ValueError, match="has no option"):
        evaluate(run, lengths=[1])


@pytest.mark.slow
def test_tiny_run_beats_chance_on_the_procedural_data(tmp_path: Path) -> None:
    config = tiny_config(
        {"method": "rope_axial"}, steps=90, batch_size=32, lr=3e-3, warmup_steps=5, schedule="cosine", log_every=30
    )
    config["model"]["img_size"] = 24  # a 6 x 6 grid: shapes a few pixels wide
    config["space"] = {**SPACE, "L": [6, 6]}
    config["eval"]["val_images"] = 64
    res = train(build_task(config, tmp_path), TrainConfig(**config["train"]), tmp_path)
    assert res["val/top1"] > 70.0, res  # 2 classes (red left / right of blue): chance is 50%
    assert isinstance(parse_config(config), ViTConfig)

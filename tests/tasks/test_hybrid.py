"""The interleaved text + image recipe: a YAML-only hybrid space, seeded examples, positions per
view, readouts decidable from positions alone, balanced targets, every method with more and
larger images, a tiny run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seqpe_nd.tasks.engine.evaluation import EVAL_JSON
from seqpe_nd.positions import HybridSpace, load_space
from seqpe_nd.tasks.recipes import hybrid
from seqpe_nd.tasks.backbones.interleaved import readout_slots
from seqpe_nd.tasks.data.interleaved import (
    COLORS,
    IMAGE_END,
    IMAGE_WORD,
    SENTENCE_LEN,
    VOCAB,
    HybridDataConfig,
    example_batch,
    make_example,
    segments,
)
from seqpe_nd.tasks.recipes import get_recipe, load_config
from seqpe_nd.tasks.engine.trainer import train
from seqpe_nd.tasks.data.scenes import render

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "hybrid"
SMOKE = sorted((CONFIGS / "smoke").glob("*.yaml"))
SEQPE = {
    "method": "seqpe",
    "integration": "attn_mul",
    "per_layer": True,
    "hidden": 32,
    "layers": 1,
    "heads": 2,
    "dropout": 0.0,
}
# (positions view, PE config) of every method the recipe compares.
METHODS = {
    "nope": ("hybrid", {"method": "nope"}),
    "rope_flat": ("flat", {"method": "rope"}),
    "ape_sin_flat": ("flat", {"method": "ape_sin"}),
    "ape_learn_flat": ("flat", {"method": "ape_learn"}),
    "mrope": ("hybrid", {"method": "mrope"}),
    "alibi_nd": ("hybrid", {"method": "alibi_nd"}),
    "seqpe": ("hybrid", SEQPE),
}


def tiny_config(view: str, pe: dict, **train: object) -> dict:
    """A reference and two candidates of 24 px (3 × 3 patches): small enough to learn on a shared CPU in seconds."""
    return {
        "task": "hybrid",
        "model": {
            "img_size": 24,
            "num_images": 2,
            "patch_size": 8,
            "embed_dim": 48,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
        },
        "data": {"val_size": 128},
        "space": {
            "kind": "hybrid",
            "modalities": [
                {"name": "text", "space": {"L": 14, "L_max": 100}},
                {"name": "image", "space": {"L": [3, 3], "L_max": [32, 32]}},
            ],
            "contrastive": {"batch": 4, "num_candidates": 8},
            "ood": {"num_starts": 4, "num_teachers": 8},
        },
        "positions": view,
        "pe": pe,
        "train": {
            "steps": 200,
            "batch_size": 32,
            "lr": 3.0e-3,
            "warmup_steps": 10,
            "schedule": "cosine",
            "log_every": 50,
            "seed": 0,
            **train,
        },
        "eval": {"sizes": [[2, 24], [4, 24], [2, 48]], "batch_size": 128, "val_examples": 128},
    }


def test_space_is_defined_by_yaml_alone() -> None:
    for path in SMOKE:
        config = load_config(path)
        space = load_space(yaml.safe_load(path.read_text())["space"])
        assert isinstance(space, HybridSpace) and [m.name for m in space.modalities] == ["text", "image"]
        task = get_recipe("hybrid").build_task(config, Path("unused"))
        assert task.space.model_dump() == space.model_dump()


def test_smoke_configs_cover_every_method_and_differ_only_in_it() -> None:
    configs = {p.stem: load_config(p) for p in SMOKE}
    methods = {(c.positions, c.pe.method) for c in configs.values()}
    assert methods == {(view, pe["method"]) for view, pe in METHODS.values()}
    ref = configs["seqpe"]
    for name, c in configs.items():
        for section in ("model", "data", "space", "train", "eval"):
            assert getattr(c, section) == getattr(ref, section), f"{name}.yaml differs from seqpe.yaml in {section}"


def test_examples_are_deterministic_under_a_seed() -> None:
    cfg = HybridDataConfig()
    a = make_example(5, "train", 11, 3, cfg)
    assert a == make_example(5, "train", 11, 3, cfg)
    assert a != make_example(5, "train", 12, 3, cfg) and a != make_example(6, "train", 11, 3, cfg)
    np.testing.assert_array_equal(render(a.images[0], 24), render(make_example(5, "train", 11, 3, cfg).images[0], 24))
    b1 = example_batch(cfg, 0, "validation", range(5), 3, 16)
    b2 = example_batch(cfg, 0, "validation", range(5), 3, 16)
    for key in b1:
        torch.testing.assert_close(b1[key], b2[key], rtol=0, atol=0)
    assert b1["images"].shape == (5, 4, 3, 16, 16) and b1["text"].shape == (5, SENTENCE_LEN + 8)  # reference + 3
    marks = [VOCAB[i] for i in b1["text"][0, SENTENCE_LEN:].tolist()]
    assert marks == [IMAGE_WORD, IMAGE_END] * 4


@pytest.mark.parametrize("question", ["colour", "place", "sentence"])
def test_exactly_one_candidate_answers(question: str) -> None:
    cfg = HybridDataConfig(question=question)
    for i in range(30):
        ex = make_example(0, "train", i, 4, cfg)
        assert all(w in VOCAB for w in ex.words) and len(ex.words) == SENTENCE_LEN
        cands = ex.descriptions if question == "sentence" else ex.descriptions[1:]
        ref = ex.descriptions[0]
        assert len(cands) == 4 and len(ex.images) == len(ex.descriptions)
        for j, d in enumerate(cands):
            if question == "colour":
                hit = d.color == ref.color
            elif question == "place":
                hit = (d.row, d.col) == (ref.row, ref.col)
            else:
                hit = d.words() == list(ex.words)
            assert hit == (j == ex.target)
        # The scene shows its description: colour, and a centre inside the described cell.
        shape = ex.images[-1].shapes[0]
        assert (int(shape.cy * 3), int(shape.cx * 3)) == (ex.descriptions[-1].row, ex.descriptions[-1].col)


def test_hard_distractors_copy_everything_but_the_answer() -> None:
    ex = make_example(0, "train", 3, 6, HybridDataConfig(question="colour", hard_fraction=1.0))
    ref = ex.descriptions[0]
    for j, d in enumerate(ex.descriptions[1:]):
        if j != ex.target:
            assert (d.shape, d.row, d.col) == (ref.shape, ref.row, ref.col) and d.color != ref.color


def test_positions_per_view() -> None:
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "nope"})), Path("unused"))
    pos, is_image = task.layout(2, (2, 2), torch.device("cpu"))
    text, image = task.text_id, task.image_id
    # sentence t = 0..4, [image] at 5, image 1 anchored at 6, [/image] at 7, [image] at 8, image 2 at 9, [/image] at 10
    assert pos[:SENTENCE_LEN].tolist() == [[text, t, 0, 0] for t in range(5)]
    assert pos[5].tolist() == [text, 5, 0, 0]
    assert pos[6:10].tolist() == [[image, 6, r, c] for r in range(2) for c in range(2)]
    assert pos[10].tolist() == [text, 7, 0, 0] and pos[11].tolist() == [text, 8, 0, 0]
    assert pos[12:16, 1].tolist() == [9] * 4 and pos[16].tolist() == [text, 10, 0, 0]
    assert is_image.tolist() == [False] * 6 + [True] * 4 + [False] * 2 + [True] * 4 + [False]
    assert readout_slots(is_image).tolist() == [10, 16]
    # A hybrid distance that respects the metric: a patch is nearer its own image's patches.
    assert float(task.space.delta(pos[6], pos[9])) < float(task.space.delta(pos[6], pos[12]))
    flat = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("flat", {"method": "rope"})), Path("unused"))
    assert flat.pe_positions(pos, 3).shape == (3, 17, 1) and flat.pe_positions(pos, 1)[0, :, 0].tolist() == list(
        range(17)
    )
    assert segments(2, (2, 2))[0] == ("text", SENTENCE_LEN)


def _own_image_strictly_nearest(space: HybridSpace, pos: torch.Tensor, is_image: torch.Tensor, readout: torch.Tensor,
                                view: str) -> bool:
    """Whether each readout's sorted distances to its own image's patches (image ``i`` for the ``i``-th readout) are
    elementwise strictly below its sorted distances to any other image's patches, under the hybrid metric
    (``view="hybrid"``) or in the flat 1-D index (``"flat"``): its nearest own patch beats every other image's
    nearest, its second nearest their second nearest, and so on."""
    image_of = torch.full((pos.shape[0],), -1)
    image_of[is_image] = torch.arange(len(readout)).repeat_interleave(int(is_image.sum()) // len(readout))
    slots = torch.arange(pos.shape[0])
    for i, slot in enumerate(readout.tolist()):
        if view == "hybrid":
            dist = space.delta(pos[slot], pos)  # (s,)
        else:
            dist = (slots - slot).abs().double()
        own = dist[image_of == i].sort().values
        for j in range(len(readout)):
            if j != i and not bool((own < dist[image_of == j].sort().values).all()):
                return False
    return True


@pytest.mark.parametrize("num_images", [3, 4, 5])
@pytest.mark.parametrize("grid", [(3, 3), (5, 5), (6, 6)])
def test_which_image_a_readout_reads_is_decidable_from_positions(num_images: int, grid: tuple[int, int]) -> None:
    """The tie of a marker placed before its image is gone: under the hybrid metric and in the flat index, each
    [/image] readout is strictly nearer its own image's patches than any other image's (same local cell too)."""
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "nope"})), Path("unused"))
    pos, is_image = task.layout(num_images, grid, torch.device("cpu"))
    readout = readout_slots(is_image)
    assert (~is_image[readout]).all() and (pos[readout, 0] == task.text_id).all()
    for view in ("hybrid", "flat"):
        assert _own_image_strictly_nearest(task.space, pos, is_image, readout, view), view
    patches = pos[is_image].reshape(num_images, grid[0] * grid[1], -1)  # (images, cells, w)
    for i, slot in enumerate(readout.tolist()):  # cell by cell, too: the metric's ‖(r, c)‖ term is the same
        d = task.space.delta(pos[slot], patches)  # (images, cells)
        assert (d[i] < torch.cat([d[:i], d[i + 1 :]])).all()
    # The check has teeth: the former layout (one [image] word before each image, scored there) ties.
    old = task.space.layout([("text", SENTENCE_LEN)] + [("text", 1), ("image", grid)] * num_images)
    old_image = old.modality == task.image_id
    before = torch.nonzero(old_image & ~torch.cat([old_image.new_zeros(1), old_image[:-1]]))[:, 0] - 1
    for view in ("hybrid", "flat"):
        assert not _own_image_strictly_nearest(task.space, old.positions, old_image, before, view), view


@pytest.mark.parametrize("num_images", [2, 3, 4])
def test_order_is_no_shortcut(num_images: int) -> None:
    """Targets are balanced over candidate slots, so a fixed guess scores exactly chance; and without positions
    the identical markers score every candidate alike (NoPE can only guess)."""
    cfg = HybridDataConfig()
    for split in ("train", "validation"):
        counts = np.bincount([make_example(0, split, i, num_images, cfg).target for i in range(12 * num_images)],
                             minlength=num_images)
        assert counts.tolist() == [12] * num_images
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "nope"})), Path("unused"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        logits = task.forward(model, example_batch(cfg, 0, "validation", range(4), num_images, 24)).logits
    torch.testing.assert_close(logits, logits[:, :1].expand_as(logits))
    res = hybrid.accuracy(task, model, num_images, 24, 6 * num_images, batch_size=8, device=torch.device("cpu"))
    assert res["top1"] == pytest.approx(100.0 / num_images) == pytest.approx(res["chance"])
    assert res["per_image_chance"] == pytest.approx(100.0 * max(1 / num_images, 1 - 1 / num_images))


def test_match_loss_is_a_binary_label_per_candidate() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    want = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.sigmoid(torch.tensor(1.0)))
             + torch.log(torch.sigmoid(torch.tensor(-0.5)))) / 3
    torch.testing.assert_close(hybrid.match_loss(logits, torch.tensor([0])), want)


def test_every_readout_also_names_its_own_images_colour() -> None:
    """The auxiliary label: the colour of each shown image (reference first), read at that image's readout."""
    cfg = HybridDataConfig()
    batch = example_batch(cfg, 0, "train", range(3), 2, 16)
    want = [[list(COLORS).index(d.color) for d in make_example(0, "train", i, 2, cfg).descriptions] for i in range(3)]
    assert batch["colours"].tolist() == want
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "mrope"})), Path("unused"))
    model = task.build_model()
    out = task.forward(model, batch)
    assert out.logits.shape == (3, 2) and out.classes is not None and out.classes.shape == (3, 3, len(COLORS))
    _, metrics = task.loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert float(metrics["task_loss"]) == pytest.approx(float(metrics["match_loss"]) + float(metrics["colour_loss"]))
    off = hybrid.HybridConfig.parse({**tiny_config("hybrid", {"method": "mrope"}), "colour_weight": 0.0})
    off_task = hybrid.HybridRecipe.build_task(off, Path("unused"))
    assert off_task.forward(off_task.build_model(), batch).classes is None


def test_methods_without_a_hybrid_rule_ask_for_the_flat_view() -> None:
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "rope"})), Path("unused"))
    with pytest.raises(ValueError, match="no rule for hybrid positions"):
        task.build_model()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_with_more_and_larger_images(name: str) -> None:
    view, pe = METHODS[name]
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config(view, pe)), Path("unused"))
    torch.manual_seed(0)
    model = task.build_model()
    g = torch.Generator().manual_seed(0)
    loss, _ = task.loss(model, task.train_batch(0, 0, 0, 1), generator=g)
    loss.backward()
    model.eval()
    with torch.no_grad():
        for k, size in [(2, 16), (5, 16), (2, 40), (4, 32)]:
            batch = example_batch(task.cfg.data, 0, "validation", range(2), k, size)
            logits = task.forward(model, batch).logits
            assert logits.shape == (2, k) and torch.isfinite(logits).all()


@pytest.mark.parametrize("readout", ["marker", "mean"])
def test_compiled_forward_equals_eager(readout: str) -> None:
    """Compiled, the layout's slots come from static-shape ops (no host read): same logits and loss as eager."""
    config = tiny_config("hybrid", {"method": "alibi_nd"})  # the layout's slots are the method's no matter
    config["model"]["readout"] = readout
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(config), Path("unused"))
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.train_batch(0, 0, 0, 1)
    eager = task.loss(model, batch, generator=torch.Generator().manual_seed(0))[0]
    compiled = torch.compile(model, backend="aot_eager")
    got = task.loss(compiled, batch, generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.forward(compiled, batch).logits, task.forward(model, batch).logits)


def test_layout_and_batch_must_agree() -> None:
    task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "nope"})), Path("unused"))
    model = task.build_model().eval()
    batch = example_batch(task.cfg.data, 0, "validation", range(2), 2, 16)
    batch["text"] = batch["text"][:, :-1]
    with pytest.raises(ValueError, match=r"text has 10 tokens, expected 5 \+ two per image = 11"):
        task.forward(model, batch)


@pytest.mark.slow
def test_tiny_run_beats_chance_and_evaluates_more_and_larger_images(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CPU: one thread is faster than two contended ones
    try:
        # The match is second order (own colour × reference colour): a plateau first, left after a few hundred steps.
        cfg = tiny_config("hybrid", {"method": "mrope"}, steps=500, lr=1.0e-3, warmup_steps=100)
        task = hybrid.HybridRecipe.build_task(hybrid.HybridConfig.parse(cfg), tmp_path)
        result = train(task, task.cfg.train, tmp_path)
        assert result["val/top1"] > 65.0, result  # chance: 50 %
        out = hybrid.HybridRecipe.evaluate(tmp_path, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert set(out["sizes"]) == {"2x24", "4x24", "2x48"}
    assert out["sizes"]["4x24"]["chance"] == 25.0 and out["sizes"]["2x48"]["tokens"] == SENTENCE_LEN + 3 * (2 + 36)
    assert out["sizes"]["4x24"]["per_image_chance"] == 75.0 and 0.0 <= out["sizes"]["2x24"]["per_image"] <= 100.0
    assert (tmp_path / EVAL_JSON).is_file()


def test_resume_refuses_another_positions_view(tmp_path: Path) -> None:
    """The view is part of the model: a run trained on hybrid positions cannot carry on with flat ones."""
    hybrid_view = hybrid.HybridConfig.parse(tiny_config("hybrid", {"method": "nope"}, steps=1, batch_size=4))
    train(hybrid.HybridRecipe.build_task(hybrid_view, tmp_path), hybrid_view.train, tmp_path)
    flat = hybrid.HybridConfig.parse(tiny_config("flat", {"method": "nope"}, steps=2, batch_size=4))
    with pytest.raises(ValueError, match=r"positions: checkpoint has 'hybrid', config has 'flat'"):
        train(hybrid.HybridRecipe.build_task(flat, tmp_path), flat.train, tmp_path, resume=True)

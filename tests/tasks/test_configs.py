"""Every YAML under configs/ (recursively) loads and validates against its schema."""

from pathlib import Path

import pytest
import yaml

from seqpe_nd.positions import GridSpace, HybridSpace, load_space
from seqpe_nd.tasks.recipes import lm
from seqpe_nd.tasks.cli.compare import method_config
from seqpe_nd.tasks.recipes import RECIPES, get_recipe, load_config, load_yaml, parse_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_YAML = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_configs_are_found() -> None:
    assert len(ALL_YAML) >= 10 and any(p.parts[-3:-1] == ("lm", "smoke") for p in ALL_YAML)


def is_run_config(data: dict) -> bool:
    return "task" in data or "extends" in data


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_validates(path: Path) -> None:
    """Run configs validate whole, the space they name included (loaded, not just a path); spaces load."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} must hold a mapping"
    if not is_run_config(data):  # a position space (configs/positions/, or one a run config names)
        load_space(path)
        return
    cfg = load_config(path)
    assert cfg.task in RECIPES and isinstance(cfg, get_recipe(cfg.task).config_type)
    if cfg.task == "qa":  # the space comes from the LM run it fine-tunes, unless restated
        assert cfg.space is None or isinstance(cfg.space, (GridSpace, HybridSpace))
        return
    assert isinstance(cfg.space, (GridSpace, HybridSpace)), f"{path}: space not loaded"
    if cfg.task == "lm":
        assert cfg.space.L[0] == cfg.model.block_size
        assert all(n >= 2 for n in cfg.eval.lengths or []), f"{path}: eval lengths"


def test_a_space_section_is_checked_at_load(tmp_path: Path) -> None:
    """A vit/video/hybrid config whose space does not fit its model fails at load, naming the field."""
    for task, folder in (("vit", "vit/smoke/rope_axial.yaml"), ("video", "video/smoke/nope.yaml"), ("hybrid", "hybrid/smoke/nope.yaml")):
        data = yaml.safe_load((CONFIGS / folder).read_text())
        space = load_space(data["space"] if isinstance(data["space"], dict) else CONFIGS.parent / data["space"])
        bad = {**data, "space": {**space.model_dump(mode="json"), "L_max": [5] * 9}} if task != "hybrid" else {**data, "space": {"L": 4, "L_max": 40}}
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match="space"):
            load_config(path)


def test_smoke_configs_share_everything_but_the_method() -> None:
    """Table 1 at smoke scale: same model, data, space, steps and seed for every method, and each method file is
    exactly what ``seqpe-nd compare default.yaml --methods NAME`` trains (the presets live in one place)."""
    smoke_dir = CONFIGS / "lm" / "smoke"
    smoke = {p.stem: load_config(p) for p in smoke_dir.glob("*.yaml") if is_run_config(yaml.safe_load(p.read_text()))}
    assert set(smoke) >= {"default", "nope", "ape_sin", "ape_learn", "rope", "rope-1e6", "rope-1e8", "alibi", "seqpe",
                          "seqpe-a0-b0", "seqpe-a0.1-b0", "seqpe-a0-b0.1"}
    ref = smoke["default"]
    base = load_yaml(smoke_dir / "default.yaml")
    for name, cfg in smoke.items():
        for section in ("model", "data", "space", "train", "eval"):
            mine = getattr(cfg, section)
            if name == "gpt2_stock" and section == "model":  # the stock GPT-2 of the same shape
                mine = mine.model_copy(update={"arch": ref.model.arch})
            assert mine == getattr(ref, section), f"{name}.yaml differs from default.yaml in {section}"
        assert cfg == parse_run_config(method_config(base, name, smoke_dir), config_dir=smoke_dir), name
    assert smoke["default"] == smoke["seqpe"]
    assert smoke["rope-1e6"].pe.base == 1e6 and smoke["ape_learn"].random_shift is False
    stock = smoke["gpt2_stock"]
    assert (stock.model.arch, stock.pe.method, stock.random_shift) == ("gpt2_stock", "nope", False)
    assert (smoke["seqpe-a0-b0"].pe.alpha, smoke["seqpe-a0-b0"].pe.beta, smoke["seqpe-a0-b0"].pe.hidden) == (0.0, 0.0, 128)


@pytest.mark.parametrize("path", sorted((CONFIGS / "lm" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_build_gpt2_small(path: Path) -> None:
    """GPT-2 small with the GPT-2 vocabulary (no download); on the meta device where the PE allows it."""
    import contextlib

    import torch

    cfg = load_config(path)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.train.batch_size, cfg.train.precision) == (12, 768, 512, 32, "bf16")
    # The SeqPE encoder reads its digit tables at construction, so it is built for real (once).
    with contextlib.nullcontext() if cfg.pe.method == "seqpe" else torch.device("meta"):
        model = lm.build_model(cfg, vocab_size=50257, eos_id=50256)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pe."))
    assert 123e6 < backbone < 125e6  # GPT-2 small without its 512 x 768 wpe table (the PE replaces it)


def test_space_paths_resolve_against_the_config_file_then_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From any working directory: a space next to the config, then the configs shipped with the package."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "my-space.yaml").write_text("L: 128\nL_max: 5000\n")
    run = {"task": "lm", "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128}, "pe": {"method": "rope"}}
    (tmp_path / "exp" / "mine.yaml").write_text(yaml.safe_dump({**run, "space": "my-space.yaml"}))
    (tmp_path / "exp" / "shipped.yaml").write_text(yaml.safe_dump({**run, "space": "configs/lm/smoke/text-128.yaml"}))
    monkeypatch.chdir(tmp_path)  # neither beside the config nor in a checkout
    assert load_config(tmp_path / "exp" / "mine.yaml").space.L_max == (5000,)
    assert load_config(tmp_path / "exp" / "shipped.yaml").space == load_space(CONFIGS / "lm" / "smoke" / "text-128.yaml")
    (tmp_path / "exp" / "missing.yaml").write_text(yaml.safe_dump({**run, "space": "nowhere.yaml"}))
    with pytest.raises(FileNotFoundError, match="space file 'nowhere.yaml' does not exist; looked for "):
        load_config(tmp_path / "exp" / "missing.yaml")


def test_the_configs_ship_with_the_package() -> None:
    """A non-editable install carries configs/ as package data, where the space lookup finds it."""
    import tomllib

    from seqpe_nd.tasks.recipes.config import SHIPPED_ROOT

    tools = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tools["package-dir"]["seqpe_nd.configs"] == "configs" and "seqpe_nd.configs" in tools["packages"]
    assert tools["package-data"]["seqpe_nd.configs"] == ["**/*.yaml"]
    assert (SHIPPED_ROOT / "configs" / "positions" / "text-512.yaml").is_file()


def test_a_recipe_must_implement_every_hook() -> None:
    """The base's hooks are abstract: a recipe that leaves one out cannot be built, and the error names it."""
    from seqpe_nd.tasks.recipes.base import Recipe
    from seqpe_nd.tasks.recipes.lm import LMConfig, LMRecipe

    class Partial(Recipe[LMConfig]):  # no hooks at all
        task, config_type = "partial", LMConfig

    with pytest.raises(TypeError, match="abstract methods .*batch_tokens.*build_model"):
        Partial(LMConfig.parse({"task": "lm", "model": {"block_size": 512}}))
    assert LMRecipe.__abstractmethods__ == frozenset()
    assert all(get_recipe(task).__abstractmethods__ == frozenset() for task in RECIPES)  # every shipped recipe

"""Every YAML under configs/ (recursively) loads and validates against its schema."""

from pathlib import Path

import pytest
import yaml

from seqpe_nd.positions import load_space
from seqpe_nd.tasks.recipes import lm
from seqpe_nd.tasks.recipes import RECIPES, get_recipe, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_YAML = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_configs_are_found() -> None:
    assert len(ALL_YAML) >= 10 and any(p.parts[-3:-1] == ("lm", "smoke") for p in ALL_YAML)


def validate_lm(path: Path) -> None:
    config = load_config(path)
    cfg = lm.parse_config(config)
    space = lm.resolve_space(cfg.space)  # a space file the config names must exist and validate
    assert space.ndim == 1 and space.L[0] == cfg.model.block_size, f"{path}: space.L must equal model.block_size"
    for length in cfg.eval.lengths or []:
        assert length >= 2, f"{path}: eval length {length}"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_validates(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} must hold a mapping"
    if "task" in data:
        assert data["task"] in RECIPES, f"{path}: task {data['task']!r} has no recipe (known: {sorted(RECIPES)})"
        if data["task"] == "lm":
            validate_lm(path)
        else:
            config = load_config(path)
            parse = getattr(get_recipe(data["task"]), "parse_config", None)
            if parse is not None:
                parse(config)
    else:  # a position space (configs/positions/, or one a run config names)
        load_space(path)


def test_smoke_configs_share_everything_but_the_method() -> None:
    """Table 1 at smoke scale: same model, data, space, steps and seed for every method."""
    smoke = {p.stem: load_config(p) for p in (CONFIGS / "lm" / "smoke").glob("*.yaml") if "task" in yaml.safe_load(p.read_text())}
    assert set(smoke) >= {"default", "nope", "ape_sin", "ape_learn", "rope", "rope-1e6", "rope-1e8", "alibi", "seqpe"}
    ref = smoke["seqpe"]
    for name, config in smoke.items():
        for section in ("model", "data", "space", "train", "eval"):
            assert config[section] == ref[section], f"{name}.yaml differs from seqpe.yaml in {section}"
        if name != "default":  # each method file is exactly seqpe.yaml with that method's preset
            assert lm.parse_config(config) == lm.parse_config(lm.apply_preset(ref, name)), name
    assert smoke["default"] == smoke["seqpe"]


@pytest.mark.parametrize("path", sorted((CONFIGS / "lm" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_build_gpt2_small(path: Path) -> None:
    """GPT-2 small with the GPT-2 vocabulary (no download); on the meta device where the PE allows it."""
    import contextlib

    import torch

    cfg = lm.parse_config(load_config(path))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.train.batch_size, cfg.train.precision) == (12, 768, 512, 32, "bf16")
    # The SeqPE encoder reads its digit tables at construction, so it is built for real (once).
    with contextlib.nullcontext() if cfg.pe.method == "seqpe" else torch.device("meta"):
        model = lm.build_model(cfg, lm.resolve_space(cfg.space), vocab_size=50257, eos_id=50256)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pe."))
    assert 123e6 < backbone < 125e6  # GPT-2 small without its 512 x 768 wpe table (the PE replaces it)

"""``seqpe-nd eval``'s recipe flags are built from the recipe's eval section: a new recipe touches nothing in cli/."""

from typing import Literal

import pytest
from pydantic import PositiveInt

from seqpe_nd.tasks.cli.evaluate import recipe_parser
from seqpe_nd.tasks.recipes import RECIPES, get_recipe
from seqpe_nd.tasks.recipes.base import Recipe
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SizePair


class ToyEvalSettings(EvalSettings):
    """A recipe of the test's own: one field of each kind a flag is built for."""

    sizes: list[SizePair] | None = None
    """(items, pixels) pairs."""
    mode: Literal["fast", "exact"] = "fast"
    """How to measure (100 % exact)."""
    scale: float = 1.0
    """A factor."""
    verbose: bool = False
    """Print more."""
    val_items: PositiveInt = 8
    """Validation during training only: not an evaluation option."""


class ToyConfig(RunConfig):
    task: Literal["toy"] = "toy"
    eval: ToyEvalSettings = ToyEvalSettings()


class ToyRecipe(Recipe[ToyConfig]):  # abstract: only its class-level description is used here
    task = "toy"
    config_type = ToyConfig


def toy_config() -> ToyConfig:
    return ToyConfig.parse({"space": {"L": [4], "L_max": [8]}, "pe": {"method": "nope"}})


def test_every_eval_field_but_the_validation_ones_is_a_flag() -> None:
    parser = recipe_parser(ToyRecipe, {"eval": {"mode": "exact"}})
    ns = parser.parse_args(["RUN", "--sizes", "8x32", "4x16", "--mode", "exact", "--scale", "0.5", "--verbose"])
    options = {n: getattr(ns, n) for n in ToyEvalSettings.option_names()}
    assert ToyRecipe.eval_options() == ("sizes", "mode", "scale", "verbose")
    cfg = toy_config().with_eval(**options)
    assert cfg.eval == ToyEvalSettings(sizes=[(8, 32), (4, 16)], mode="exact", scale=0.5, verbose=True)
    assert toy_config().with_eval(sizes=None) == toy_config()  # None keeps the config's value
    text = parser.format_help()
    assert "How to measure (100 % exact). (this run: 'exact')" in " ".join(text.split())
    with pytest.raises(SystemExit):
        parser.parse_args(["RUN", "--val-items", "3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["RUN", "--mode", "slow"])


def test_a_bad_option_names_the_eval_field_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"eval\.sizes\.0: '8by32' is not AxP, e.g. 8x32"):
        toy_config().with_eval(sizes=["8by32"])
    with pytest.raises(ValueError, match=r"eval\.mode: 'slow' is not allowed; allowed: fast, exact"):
        toy_config().with_eval(mode="slow")


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_every_shipped_recipe_keeps_its_flags(task: str) -> None:
    """Today's flags of each recipe, now read off its eval section."""
    want = {
        "lm": {"--lengths", "--split", "--max-tokens"},
        "qa": {"--lengths", "--split", "--num-examples", "--max-tokens", "--checkpoint"},
        "vit": {"--resolutions", "--max-images", "--batch-size"},
        "video": {"--sizes", "--max-clips", "--batch-size"},
        "hybrid": {"--sizes", "--max-examples", "--batch-size"},
    }[task]
    flags = {o for a in recipe_parser(get_recipe(task), {})._actions for o in a.option_strings}
    assert want <= flags
    assert not any(f.startswith("--val-") for f in flags)

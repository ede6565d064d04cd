"""The paper's tasks, one module each on one shared base (:mod:`seqpe_nd.tasks.recipes.base`).

A run config's ``task:`` picks the recipe; :func:`~seqpe_nd.tasks.recipes.config.load_config`
validates the whole file into that recipe's typed config. Recipe modules import backbones, data
and the engine, never each other.
"""

import importlib
from typing import TYPE_CHECKING

from seqpe_nd.tasks.recipes.config import RunConfig, apply_override, load_config, load_yaml, parse_run_config

if TYPE_CHECKING:
    from seqpe_nd.tasks.recipes.base import Recipe

# task name -> "module:class" implementing it (imported on first use: transformers and timm are heavy)
RECIPES: dict[str, str] = {
    "lm": "seqpe_nd.tasks.recipes.lm:LMRecipe",
    "vit": "seqpe_nd.tasks.recipes.vit:ViTRecipe",
    "qa": "seqpe_nd.tasks.recipes.qa:QARecipe",
    "video": "seqpe_nd.tasks.recipes.video:VideoRecipe",
    "hybrid": "seqpe_nd.tasks.recipes.hybrid:HybridRecipe",
}


def get_recipe(task: str) -> "type[Recipe]":
    """The recipe class of ``task``; unknown names list the known ones."""
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; allowed: {sorted(RECIPES)}")
    module, name = RECIPES[task].split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["RECIPES", "RunConfig", "apply_override", "get_recipe", "load_config", "load_yaml", "parse_run_config"]

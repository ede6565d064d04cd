"""Recipe registry and YAML run configs with dotted command-line overrides.

A run config is one YAML file: a top-level ``task:`` naming the recipe, a ``train:`` section
(:class:`~seqpe_nd.tasks.engine.trainer.TrainConfig`) and whatever sections the recipe validates itself
(``model:``, ``pe:``, ``data:`` ...). A recipe module exposes::

    build_task(config: dict, run_dir: Path) -> TrainTask
    evaluate(run_dir: Path, **options) -> dict
"""

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast, runtime_checkable

import yaml
from pydantic import ValidationError

from seqpe_nd.tasks.engine.trainer import TrainConfig, TrainTask

# task name -> module implementing it
RECIPES: dict[str, str] = {
    "lm": "seqpe_nd.tasks.recipes.lm",
    "vit": "seqpe_nd.tasks.recipes.vit",
    "qa": "seqpe_nd.tasks.recipes.qa",
    "video": "seqpe_nd.tasks.recipes.video",
    "hybrid": "seqpe_nd.tasks.recipes.hybrid",
}


@runtime_checkable
class Recipe(Protocol):
    """What a recipe module exposes."""

    def build_task(self, config: dict[str, Any], run_dir: Path) -> TrainTask: ...

    def evaluate(self, run_dir: Path, **options: Any) -> dict[str, Any]: ...


def get_recipe(task: str) -> Recipe:
    """The recipe module of ``task``; unknown names list the known ones."""
    if task not in RECIPES:
        raise ValueError(f"unknown task {task!r}; allowed: {sorted(RECIPES)}")
    module: ModuleType = importlib.import_module(RECIPES[task])
    for name in ("build_task", "evaluate"):
        if not callable(getattr(module, name, None)):
            raise TypeError(f"recipe module {RECIPES[task]} has no {name}()")
    return cast(Recipe, module)


# --- YAML ----------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``5e-5`` as a float (PyYAML's YAML 1.1 rules need ``5.0e-5``)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_ch] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_ch, []) if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d[\d_]*[eE][-+]?\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A command-line value with YAML semantics: ``10`` int, ``1e-4`` float, ``true`` bool, ``[1, 2]`` list."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.load(path.read_text(), Loader=_Loader)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping with a top-level 'task:' key")
    return data


def apply_override(config: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` in place. Missing keys are created (the schema judges them later)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r} has an empty key part")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = parse_value(text)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted field path."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(e["loc"]))
        shown = "input" in e and e["type"] != "missing" and e["loc"] and not isinstance(e["input"], dict)
        lines.append(f"{path or '<root>'}: {e['msg']}" + (f" (got {e['input']!r})" if shown else ""))
    return "; ".join(lines)


def load_config(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a run config, apply ``--set`` overrides, check ``task`` and ``train``; return the dict."""
    config = load_yaml(path)
    for item in overrides:
        apply_override(config, item)
    task = config.get("task")
    if task is None:
        raise ValueError(f"{path}: missing top-level 'task:' (allowed: {sorted(RECIPES)})")
    if task not in RECIPES:
        raise ValueError(f"{path}: task: unknown task {task!r}; allowed: {sorted(RECIPES)}")
    train_section = config.setdefault("train", {})
    if not isinstance(train_section, Mapping):
        raise ValueError(f"{path}: train: must be a mapping, got {train_section!r}")
    train_config(config)
    return config


def train_config(config: Mapping[str, Any]) -> TrainConfig:
    """The validated ``train:`` section; errors name ``train.<field>``."""
    try:
        return TrainConfig.model_validate(config.get("train") or {})
    except ValidationError as err:
        raise ValueError(format_validation_error(err, "train")) from None

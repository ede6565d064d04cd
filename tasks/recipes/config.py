"""Run configs: one YAML file per run, validated once at load into a typed model.

A run config has a top-level ``task:`` naming the recipe; its other sections are the recipe's
config model (:class:`RunConfig` and a subclass per recipe). :func:`load_config` reads the YAML,
applies ``--set dotted.key=value`` overrides and validates the whole file against the union of
every recipe's config, discriminated on ``task``, so a recipe only ever receives its typed model.

A ``space:`` field holds a position space: inline, or a YAML path looked up relative to the
config file, then the working directory, then the configs shipped with the package (so
``configs/positions/text-512.yaml`` works from any directory and from a non-editable install). The
config file itself is found the same way (:func:`~seqpe_nd.positions.errors.find_config_file`, one
mechanism for run configs, spaces and PE configs).
"""

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import BeforeValidator, PositiveInt, ValidationError

from seqpe_nd.encodings import PEConfig
from seqpe_nd.positions import Frozen, GridSpace, HybridSpace, PositionSpace, load_space
from seqpe_nd.positions.errors import (  # noqa: F401 (SHIPPED_ROOT: re-exported for the CLI)
    SHIPPED_ROOT,
    did_you_mean,
    find_config_file,
    format_validation_error,
    read_yaml_file,
)
from seqpe_nd.tasks.engine.trainer import TrainConfig

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


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of one YAML file, as written (``extends:`` not followed)."""
    path = Path(path)
    data = read_yaml_file(path, what="config", loader=_Loader)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping with a top-level 'task:' key")
    return data


def load_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a run-config YAML file, with ``extends: other.yaml`` (relative to the file) merged under it.

    A file that only states what differs from another (``extends: default.yaml`` and a ``pe:``) is how
    one method's config derives from a shared one; see :func:`merge_sections` for the rule.
    """
    path = Path(path)
    data = read_yaml(path)
    if "extends" in data:
        base = find_config_file(str(data.pop("extends")), path.resolve().parent, what=f"{path}: extends")
        if base.resolve() in (*_chain, path.resolve()):
            raise ValueError(f"{path}: extends: configs form a cycle through {base}")
        data = merge_sections(load_yaml(base, (*_chain, path.resolve())), data)
    return data


def merge_sections(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section; a section naming another ``method`` replaces the base's."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(below, dict) and isinstance(value, dict) and value.get("method", below.get("method")) == below.get("method"):
            out[key] = merge_sections(below, value)
        else:
            out[key] = value
    return out


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


def check_multiples(**pairs: tuple[int, str, int]) -> None:
    """``name=(value, other_name, other_value)``: each value must be a multiple of the other (one error naming both)."""
    for name, (value, other, divisor) in pairs.items():
        if value % divisor:
            raise ValueError(f"{name} = {value} must be a multiple of {other} = {divisor}")


# --- the space field ------------------------------------------------------------------------------

def _space_source(value: Any, info: Any) -> Any:  # info: pydantic ValidationInfo (a Protocol)
    """A path becomes the space's mapping (read relative to the config file); a mapping defaults to ``kind: grid``."""
    if isinstance(value, (str, Path)):
        config_dir = (info.context or {}).get("config_dir")
        return load_space(find_config_file(value, config_dir, what="space"))  # errors name the file
    if isinstance(value, dict):
        return {"kind": "grid", **value}
    return value


SpaceField = Annotated[PositionSpace, BeforeValidator(_space_source)]
"""A position space in a run config: inline, or a path to a space YAML (see :func:`find_config_file`)."""


# --- the eval section ------------------------------------------------------------------------------

def _size_pair(value: Any) -> Any:
    """``"8x32"`` (the command line's spelling) becomes ``(8, 32)``; anything else is left to the type."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{value!r} is not AxP, e.g. 8x32")
        return int(parts[0]), int(parts[1])
    return value


SizePair = Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_size_pair)]
"""Two sizes of one evaluation input, e.g. (frames, pixels): a pair in YAML, or ``8x32`` on the command line."""


class EvalSettings(Frozen):
    """Base of every recipe's ``eval:`` section. Its fields are the options of ``Recipe.evaluate`` and of
    ``seqpe-nd eval`` (``--max-images 64``, ``--set eval.max_images=64``), except the ``val_…`` fields: those
    size the validation run during training."""

    validation_prefix: ClassVar[str] = "val_"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The fields an evaluation may override, in declaration order."""
        return tuple(name for name in cls.model_fields if not name.startswith(cls.validation_prefix))


# --- run configs ------------------------------------------------------------------------------------

C = TypeVar("C", bound="RunConfig")


class RunConfig(Frozen):
    """What every recipe's run config has; a recipe subclasses it with ``task: Literal[...]`` and its sections."""

    task: str
    space: SpaceField
    """Position space: an inline mapping or a YAML path (relative to the config file, the working directory or
    the shipped configs)."""
    pe: PEConfig
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope, alibi, seqpe, ...)."""
    random_shift: bool = False
    """Shift a whole step's positions with the space's ``shift.prob`` (App. A.5)."""
    train: TrainConfig = TrainConfig()
    eval: EvalSettings = EvalSettings()
    """Evaluation (``seqpe-nd eval``) and the validation run during training; each recipe has its own fields."""

    @classmethod
    def parse(cls: "type[C]", data: "dict[str, Any] | C", *, config_dir: Path | None = None) -> "C":
        """Validate a run config; errors name the dotted field path (one ValueError)."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data, context={"config_dir": config_dir})
        except ValidationError as err:
            raise ValueError(format_validation_error(err, model=cls)) from None

    @classmethod
    def eval_settings_type(cls) -> type[EvalSettings]:
        """The recipe's ``eval:`` section: its fields are the options of ``Recipe.evaluate`` and ``seqpe-nd eval``."""
        settings = cls.model_fields["eval"].annotation
        assert isinstance(settings, type) and issubclass(settings, EvalSettings)
        return settings

    def with_eval(self: C, **options: Any) -> C:
        """This config with ``eval`` fields overridden (None: keep the config's); checked like the YAML, errors
        naming ``eval.<field>``."""
        settings_type = self.eval_settings_type()
        given = {k: v for k, v in options.items() if v is not None}
        if not given:
            return self
        try:
            settings = settings_type.model_validate({**self.eval.model_dump(), **given})
        except ValidationError as err:
            raise ValueError(format_validation_error(err, prefix="eval", model=settings_type)) from None
        return self.model_copy(update={"eval": settings})

    def grid_space(self, ndim: int) -> GridSpace:
        """``space`` as the ``ndim``-D grid space this recipe needs (a clear error otherwise)."""
        space = self.space
        if not isinstance(space, GridSpace) or space.ndim != ndim:
            got = f"a {space.ndim}-D grid" if isinstance(space, GridSpace) else f"a {space.kind} space"
            raise ValueError(f"space: the {self.task} recipe needs a {ndim}-D grid space, got {got}")
        return space

    def hybrid_space(self) -> HybridSpace:
        if not isinstance(self.space, HybridSpace):
            raise ValueError(f"space: the {self.task} recipe needs a hybrid space (kind: hybrid), got kind {self.space.kind!r}")
        return self.space


def parse_run_config(data: dict[str, Any], *, config_dir: Path | None = None, source: str = "") -> RunConfig:
    """Validate a run config of any recipe (picked by its ``task``); one ValueError naming every bad field."""
    from seqpe_nd.tasks.recipes import RECIPES, get_recipe

    where = f"{source}: " if source else ""
    task = data.get("task")
    if task is None:
        raise ValueError(f"{where}missing top-level 'task:' (allowed: {sorted(RECIPES)})")
    if task not in RECIPES:
        raise ValueError(f"{where}task: unknown task {task!r}{did_you_mean(str(task), RECIPES)}; allowed: {sorted(RECIPES)}")
    config_type = get_recipe(task).config_type  # imports that recipe alone (an LM config never imports timm)
    try:
        return config_type.model_validate(data, context={"config_dir": config_dir})
    except ValidationError as err:
        raise ValueError(where + format_validation_error(err, model=config_type)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config (the path, else the shipped configs), apply ``--set`` overrides and validate it into the
    recipe's typed model; a mistake is one ValueError naming the file, the field, the value and what is allowed."""
    path = find_config_file(path, what="config")
    data = load_yaml(path)
    for item in overrides:
        apply_override(data, item)
    return parse_run_config(data, config_dir=path.resolve().parent, source=str(path))


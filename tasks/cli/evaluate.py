"""``seqpe-nd eval RUN_DIR [RUN_DIR ...] [--lengths 128 256 ...]``: evaluate trained runs.

Dispatches on the ``task`` saved in each run's ``config.json`` (see :mod:`seqpe_nd.tasks.recipes`). The flags
besides the few below are built from that recipe's ``eval:`` section
(:class:`~seqpe_nd.tasks.recipes.config.EvalSettings`): each field but the ``val_…`` ones is a flag, its
docstring the help, so ``--max-images 64`` means ``eval.max_images: 64`` and a new recipe needs nothing here.
``seqpe-nd eval RUN --help`` lists the flags of RUN's recipe. For the LM recipe this is the
length-extrapolation protocol of §4.1; with several runs it also prints one comparison table and writes
``--out``'s JSON and PNG.
"""

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.engine.evaluation import RUN_CONFIG, read_run_config
from seqpe_nd.tasks.recipes import get_recipe
from seqpe_nd.tasks.recipes.config import parse_value

HELP = "evaluate trained runs (LM: perplexity at longer contexts)"
RUN_FLAGS = "the fields of RUN's recipe's eval: section are flags too (seqpe-nd eval RUN --help lists them)"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("eval", help=HELP, description=__doc__.splitlines()[0], epilog=RUN_FLAGS, add_help=False)
    add_common_flags(p)
    p.set_defaults(func=run_eval, more_flags=True, parser=p)  # the recipe's flags are parsed once the runs are known


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every recipe's evaluation."""
    p.add_argument("-h", "--help", action="store_true", help="show this help (with RUN: its recipe's flags too)")
    p.add_argument("run_dirs", nargs="*", type=Path, metavar="RUN_DIR", help="training run directories")
    p.add_argument(
        "--option", dest="extra", action="append", default=[], metavar="KEY=VALUE",
        help="any option of the run's recipe's evaluate(), as a YAML value, e.g. --option max_examples=64 "
        "--option sizes=[[4,32],[8,64]] (repeatable)",
    )
    p.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="eval.KEY=VALUE",
        help="the same as --option KEY=VALUE, spelt as the run config's eval section (e.g. --set eval.max_images=64)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: CUDA when available)")
    p.add_argument("--out", type=Path, default=None, help="with several runs: write the comparison here (DIR/compare.json, compare.png)")


def recipe_parser(recipe: Any, run_config: dict[str, Any]) -> argparse.ArgumentParser:
    """The whole ``eval`` command line of one recipe: the common flags and one per field of its eval section."""
    p = argparse.ArgumentParser(prog="seqpe-nd eval", description=__doc__.splitlines()[0], add_help=False)
    add_common_flags(p)
    settings = recipe.config_type.eval_settings_type()
    saved = run_config.get("eval") or {}
    group = p.add_argument_group(f"evaluation settings of the {recipe.task} recipe (its eval: section)")
    for name in settings.option_names():
        field = settings.model_fields[name]
        value = saved.get(name, field.default)
        text = (field.description or "").replace("%", "%%") + f" (this run: {value!r})"
        group.add_argument(flag(name), dest=name, default=None, help=text, **argument_kind(field.annotation))
    return p


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def argument_kind(annotation: Any) -> dict[str, Any]:
    """argparse's ``nargs`` / ``choices`` / ``metavar`` for a field's type; each value is read as YAML and checked by
    the eval section's model (:meth:`RunConfig.with_eval`)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    kind: dict[str, Any] = {"type": parse_value}
    if typing.get_origin(annotation) is list:
        kind["nargs"] = "+"
        annotation = typing.get_args(annotation)[0]
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        kind["choices"] = list(typing.get_args(annotation))
    elif typing.get_origin(annotation) is tuple:
        kind["metavar"] = "AxB"
    elif annotation is bool:
        kind = {"action": argparse.BooleanOptionalAction}
    else:
        kind["metavar"] = {int: "N", float: "X"}.get(annotation, "VALUE")
    return kind


def task_of(run_dir: Path) -> str:
    task = read_run_config(run_dir).get("task")
    if not task:
        raise ValueError(f"{run_dir}/config.json has no 'task' field")
    return str(task)


def extra_options(items: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items as keyword arguments of ``evaluate`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option {item!r} is not KEY=VALUE, e.g. --option max_examples=64")
        if key in flags or key in out:
            raise ValueError(f"--option {key} is given twice (once as {flag(key)} or --option)")
        out[key] = parse_value(text)
    return out


def run_eval(args: argparse.Namespace) -> int:
    argv = args.argv[args.argv.index("eval") + 1:]
    runs = [r for r in args.run_dirs if r.exists()]  # this first parse may also hold values of recipe flags
    if not runs:
        if args.help:
            args.parser.print_help()
            return 0
        raise ValueError(f"{args.run_dirs[0]} does not exist; give training run directories" if args.run_dirs
                         else "give one or more training run directories, e.g. seqpe-nd eval runs/my-run")
    tasks = {task_of(r) for r in runs}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks {sorted(tasks)} cannot be compared; evaluate them one task at a time")
    recipe = get_recipe(tasks.pop())
    parser = recipe_parser(recipe, read_run_config(runs[0]))
    if args.help:
        parser.print_help()
        return 0
    ns, unknown = parser.parse_known_args(argv)
    names = recipe.config_type.eval_settings_type().option_names()
    if unknown_flags := [t for t in unknown if t.startswith("-")]:
        raise ValueError(f"the {recipe.task} recipe's evaluation has no option(s) {', '.join(unknown_flags)}; "
                         f"its options: {', '.join(flag(n) for n in names)}")
    if unknown or not ns.run_dirs:
        raise ValueError(f"not a training run directory (with {RUN_CONFIG}): {', '.join(unknown)}" if unknown
                         else "give the training run directories before the flags, e.g. seqpe-nd eval RUN --lengths 512")
    options = {n: getattr(ns, n) for n in names if getattr(ns, n) is not None}
    settings = []
    for item in ns.settings:
        if not item.startswith("eval."):
            raise ValueError(f"--set {item!r}: eval takes the run config's eval settings only, e.g. --set eval.max_images=64")
        settings.append(item.removeprefix("eval."))
    options.update(extra_options([*ns.extra, *settings], options))
    results = {run_dir.name: recipe.evaluate(run_dir, device=ns.device, **options) for run_dir in ns.run_dirs}
    if len(results) > 1:
        recipe.write_comparison(results, ns.out, title=f"{recipe.metric[1]} vs evaluation size")
        if ns.out is not None:
            print("wrote " + ", ".join(str(ns.out / name) for name in ("compare.json", "compare.md", "compare.png")))
    return 0

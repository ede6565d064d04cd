"""User-facing errors and files, written once for every room: config files found the same way
everywhere (:func:`find_config_file`, falling back to the configs shipped with the package), YAML
files that name themselves when they are broken, and pydantic validation errors as one line per
problem with the dotted field path, the bad value, what is allowed and, for a near miss, a "did
you mean" (:func:`validated` turns them into one ValueError for the Python API and the CLI alike).
"""

import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

SHIPPED_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the shipped ``configs/``: the checkout, or ``site-packages/seqpe_nd`` when installed."""


def find_config_file(name: str | Path, config_dir: Path | None = None, *, what: str = "config") -> Path:
    """A file a user or a config names: absolute, or relative to ``config_dir`` (the naming config's folder),
    the working directory, then the configs shipped with the package; the first that exists wins.

    ``configs/positions/text-512.yaml`` thus works from any directory and from a non-editable install.
    Nothing found is one FileNotFoundError listing every place looked.
    """
    p = Path(name)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [*([Path(config_dir) / p] if config_dir is not None else []), p, SHIPPED_ROOT / p]
    for candidate in candidates:
        if candidate.exists():  # a directory too: read_yaml_file names it as one
            return candidate
    looked = ", ".join(dict.fromkeys(str(c.absolute()) for c in candidates))
    raise FileNotFoundError(f"{what} file {str(name)!r} does not exist; looked for {looked}")


def read_yaml_file(source: str | Path, *, what: str = "YAML", loader: type[Any] = yaml.SafeLoader) -> Any:
    """The content of a YAML file; a missing file, a folder, a binary file or bad YAML is one clear error naming it."""
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{what} file {str(path)!r} is a directory; give the path of a .yaml file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file (byte {err.start} is not UTF-8); a {what} file is YAML text") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss among ``allowed``, else an empty string."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Annotated, unions, Optional, lists and dicts)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is Annotated:
        return _models(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, dict, Sequence, Mapping):
        return [m for a in get_args(annotation) for m in _models(a)]
    return []


def _tag(model: type[BaseModel]) -> set[str]:
    """The values a discriminated-union member is picked by (its Literal fields' defaults), as pydantic's loc names them."""
    tags = set()
    for f in model.model_fields.values():
        if get_origin(f.annotation) is Literal:
            tags.update(str(a) for a in get_args(f.annotation))
    return tags


def fields_at(root: Any, loc: Sequence[Any]) -> list[str] | None:
    """The field names allowed at ``loc`` (a pydantic error location) under ``root``, when they can be told."""
    candidates = _models(root)
    for part in loc:
        if not candidates:
            return None
        if isinstance(part, int):
            continue
        tagged = [m for m in candidates if str(part) in _tag(m) and part not in m.model_fields]
        if tagged and len(candidates) > 1:
            candidates = tagged
            continue
        nxt = [m for c in candidates if part in c.model_fields for m in _models(c.model_fields[part].annotation)]
        if not nxt:
            return None if not any(part in c.model_fields for c in candidates) else []
        candidates = nxt
    if len(candidates) != 1:
        return None
    return sorted(candidates[0].model_fields)


def shown_loc(root: Any, loc: Sequence[Any]) -> tuple[Any, ...]:
    """``loc`` as the user wrote it: the tags pydantic inserts for a discriminated union (``pe.rope.base``,
    ``grid.L_max``) dropped, so the path is the file's own (``pe.base``, ``L_max``)."""
    candidates, shown = _models(root), []
    for part in loc:
        if candidates and not isinstance(part, int):
            tagged = [m for m in candidates if str(part) in _tag(m) and part not in m.model_fields]
            if tagged and len(candidates) > 1:
                candidates = tagged
                continue
            candidates = [m for c in candidates if part in c.model_fields for m in _models(c.model_fields[part].annotation)]
        shown.append(part)
    return tuple(shown)


def _suggested_fields(errors: Sequence[Mapping[str, Any]], model: Any) -> set[tuple[Any, ...]]:
    """The locations a near-miss unknown field points to (``Lmax`` -> ``L_max``): their "Field required" is noise."""
    out = set()
    for e in errors:
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden" and loc and model is not None:
            close = difflib.get_close_matches(str(loc[-1]), fields_at(model, loc[:-1]) or [], n=1, cutoff=0.6)
            out.update((*loc[:-1], c) for c in close)
    return out


def format_errors(errors: Iterable[Mapping[str, Any]], prefix: str = "", model: Any = None) -> str:
    """One line per problem: the dotted field path, what is wrong, the bad value, and what is allowed."""
    lines = []
    errors = list(errors)
    suggested = _suggested_fields(errors, model)
    for e in errors:
        loc = tuple(e["loc"])
        if e["type"] == "missing" and loc in suggested:
            continue  # the unknown field's "did you mean" already says it
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + (shown_loc(model, loc) if model is not None else loc))
        if e["type"] == "extra_forbidden" and loc:
            allowed = fields_at(model, loc[:-1]) if model is not None else None
            hint = did_you_mean(str(loc[-1]), allowed or [])
            known = f"; allowed: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{path}: unknown field {str(loc[-1])!r}{hint}{known}")
            continue
        ctx = e.get("ctx") or {}
        if e["type"] == "union_tag_invalid":  # e.g. pe.method: rop
            allowed = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            key = str(ctx.get("discriminator", "")).strip("'")
            where = ".".join(p for p in (path, key) if p)
            tag = str(ctx.get("tag"))
            lines.append(f"{where}: unknown {key} {tag!r}{did_you_mean(tag, allowed)}; allowed: {', '.join(allowed)}")
            continue
        if e["type"] == "literal_error" and isinstance(e.get("input"), str):
            allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
            lines.append(f"{path}: {e['input']!r} is not allowed{did_you_mean(e['input'], allowed)}; allowed: {', '.join(allowed)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")  # our own validators' messages, without pydantic's label
        shown = "input" in e and e["type"] not in ("missing", "value_error") and loc and not isinstance(e["input"], dict)
        lines.append((f"{path}: {msg}" if path else msg) + (f" (got {e['input']!r})" if shown else ""))  # a whole-model check names its fields
    return "; ".join(lines)


def format_validation_error(err: ValidationError, prefix: str = "", model: Any = None) -> str:
    """:func:`format_errors` of a pydantic ValidationError."""
    return format_errors(err.errors(), prefix, model)


def validated(adapter: TypeAdapter, data: Any, *, model: Any, source: str | Path = "", context: Any = None) -> Any:  # type: ignore[type-arg]
    """``adapter.validate_python(data)``; a ValidationError becomes one ValueError in the words of
    :func:`format_errors`, prefixed with ``source`` (the file) when there is one."""
    try:
        return adapter.validate_python(data, context=context)
    except ValidationError as err:
        where = f"{source}: " if str(source) else ""
        raise ValueError(where + format_validation_error(err, model=model)) from None

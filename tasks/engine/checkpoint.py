"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON for everything else.

Layout of one run directory::

    run_dir/checkpoints/step_000100/   model.safetensors        weights (tied tensors stored once)
                                       optimizer.safetensors    optimizer tensors, flattened
                                       optimizer.json           optimizer structure and scalars
                                       rng.safetensors/.json    torch CPU/CUDA RNG + the loop's generators
                                       state.json               step, data position, seeds, world size
                                       config.json              the resolved run config
    run_dir/checkpoints/latest         name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory beside its final place, every file and
the directory are fsynced, and only then is it renamed into place and ``latest`` moved to it (both
with ``os.replace``). A crash at any moment leaves the previous checkpoint and pointer intact.
"""

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_PREFIX = "step_"
_TMP = ".tmp-"
_COMPLETE = "state.json"  # written last inside the temp dir: its presence marks a whole checkpoint


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


# --- generic nested state <-> (JSON tree, flat tensor dict) -------------------------------------

def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested dict/list/tuple of tensors and scalars into a JSON tree and named tensors.

    Tensors become ``{"__tensor__": name}``; tuples and dicts with non-string keys are tagged so
    that :func:`unflatten_state` restores them exactly (an optimizer's ``state`` has int keys and
    AdamW's ``betas`` is a tuple).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path if path not in tensors else f"{path}#{len(tensors)}"  # {"a.b": .., "a": {"b": ..}}
            tensors[name] = x.detach().to("cpu").contiguous()
            return {"__tensor__": name}
        if isinstance(x, Mapping):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: walk(v, f"{path}.{k}" if path else k) for k, v in x.items()}}
            items = []
            for k, v in x.items():
                if not isinstance(k, (int, float, bool, str)) and k is not None:
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {path or '<root>'!r}")
                items.append([k, walk(v, f"{path}.{k}" if path else str(k))])
            return {"__items__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a value of type {type(x).__name__} at {path or '<root>'!r} (no pickle)")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
    return tree


# --- durable file primitives ---------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _save_tree(directory: Path, stem: str, obj: Any) -> None:
    tree, tensors = flatten_state(obj)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    _write_json(directory / f"{stem}.json", tree)


def _load_tree(directory: Path, stem: str) -> Any:
    tensors = read_tensors(directory / f"{stem}.safetensors")
    tree = read_json(directory / f"{stem}.json")
    return unflatten_state(tree, tensors)


# --- reading: a file that exists but cannot be read is named --------------------------------------

class CorruptFile(ValueError):
    """A file that exists but cannot be read (torn by a crash or a full disk, or not what it claims to be)."""


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; a torn or non-JSON file raises :class:`CorruptFile` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CorruptFile(f"{path} is torn or not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise CorruptFile(f"{path} is not a text file; expected JSON") from None


@contextmanager
def _reading_safetensors(path: Path) -> Iterator[str]:
    """The path to hand safetensors; a missing file is named, and so is one it cannot read (:class:`CorruptFile`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        yield str(path)
    except SafetensorError as err:
        raise CorruptFile(f"{path} cannot be read as safetensors ({err}); the file is torn or not a checkpoint") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a torn one raises :class:`CorruptFile` naming it."""
    with _reading_safetensors(path) as name:
        return load_file(name)


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CorruptFile` (or FileNotFoundError) naming the first file of a checkpoint that cannot be read."""
    path = Path(path)
    for name in (_COMPLETE, "config.json", "optimizer.json", "rng.json"):
        read_json(path / name)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        with _reading_safetensors(path / name) as file, safe_open(file, framework="pt") as f:
            f.keys()


# --- save ----------------------------------------------------------------------------------------

def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Mapping[str, Any],
    rng: Mapping[str, Any],
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and rotate old ones.

    Args:
        model: the bare module (not DDP- or compile-wrapped); tied weights are stored once.
        optimizer: ``optimizer.state_dict()``.
        rng: nested RNG states (tensors and scalars).
        state: JSON-able loop state (step, data position, seeds, world size, ...).
        keep_last: how many checkpoints to keep, newest first; 0 keeps all.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP}{final.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        _save_tree(tmp, "optimizer", dict(optimizer))
        _save_tree(tmp, "rng", dict(rng))
        _write_json(tmp / "config.json", dict(config))
        _write_json(tmp / _COMPLETE, {**state, "step": step})
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. a rerun): move the old one aside first
            aside = root / f"{_TMP}old-{final.name}.{os.getpid()}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    _rotate(root, keep_last, keep=final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / _COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _rotate(root: Path, keep_last: int, keep: Path) -> None:
    # Leftovers of crashed saves by this or earlier processes; only rank 0 ever writes here.
    for p in root.iterdir():
        if p.name.startswith(_TMP) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    done = list_checkpoints(root.parent)
    for p in done[:-keep_last]:
        if p != keep:  # never the one just written (the newest good one)
            shutil.rmtree(p)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; if the pointer is missing or stale, the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / _COMPLETE).is_file():
            return target
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a complete checkpoint, else the latest checkpoint of the run ``path``."""
    path = Path(path)
    if (path / _COMPLETE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


# --- load ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` read (weights are loaded separately with :func:`load_weights`)."""

    path: Path
    step: int
    state: dict[str, Any]
    config: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def diff_configs(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ, e.g. ``"pe.base: checkpoint has 10000.0, config has 1000000.0"``.

    ``expected`` is the config of the model being built, ``found`` the checkpoint's. An optional field
    that is unset (None) on one side and absent on the other is no difference: a run saved before the
    field existed still loads.
    """
    out: list[str] = []
    for key in sorted(set(expected) | set(found), key=str):
        path = f"{prefix}{key}"
        if expected.get(key) is None and found.get(key) is None:
            continue
        if key not in found:
            out.append(f"{path}: checkpoint has no such field, config has {expected[key]!r}")
        elif key not in expected:
            out.append(f"{path}: checkpoint has {found[key]!r}, config has no such field")
        elif isinstance(expected[key], Mapping) and isinstance(found[key], Mapping):
            out.extend(diff_configs(expected[key], found[key], f"{path}."))
        elif _normal(expected[key]) != _normal(found[key]):
            out.append(f"{path}: checkpoint has {found[key]!r}, config has {expected[key]!r}")
    return out


def _normal(x: Any) -> Any:
    # JSON turns tuples into lists and may turn 1e4 into 10000.0: compare values, not spellings.
    if isinstance(x, (list, tuple)):
        return [_normal(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    return x


def check_config(expected: Mapping[str, Any], found: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """Raise ``ValueError`` naming every differing field under ``sections``; return the other differences."""
    diffs = diff_configs(expected, found)
    strict = [d for d in diffs if d.split(":", 1)[0].split(".", 1)[0] in sections]
    if strict:
        raise ValueError("checkpoint does not match the model config: " + "; ".join(strict))
    return [d for d in diffs if d not in strict]


def load_checkpoint(
    path: Path, *, expected_config: Mapping[str, Any] | None = None, strict_sections: tuple[str, ...] = ("pe",),
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Checkpoint:
    """Read a checkpoint directory, or a run directory (its latest checkpoint).

    With ``expected_config``, a difference under any of ``strict_sections`` raises a ``ValueError``
    naming the field before anything is loaded into a model. ``normalize`` brings the saved config
    to today's form first (fields added since then, with their defaults).
    """
    path = resolve_checkpoint(path)
    config = read_json(path / "config.json")
    if normalize is not None:
        config = normalize(config)
    if expected_config is not None:
        check_config(expected_config, config, strict_sections)
    state = read_json(path / _COMPLETE)
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        state=state,
        config=config,
        optimizer=_load_tree(path, "optimizer"),
        rng=_load_tree(path, "rng"),
    )


def load_weights(model: nn.Module, path: Path, *, strict: bool = True) -> None:
    """Load ``model.safetensors`` of a checkpoint (or of a run's latest checkpoint) into ``model``."""
    path = resolve_checkpoint(path)
    with _reading_safetensors(path / "model.safetensors") as file:
        missing, unexpected = load_model(model, file, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )


def embedding_rows(path: Path, names: tuple[str, ...] = ("transformer.wte.weight", "lm_head.weight")) -> int:
    """Rows of the checkpoint's token embedding (stored once under either name of the tied weight)."""
    with _reading_safetensors(path / "model.safetensors") as file, safe_open(file, framework="pt") as f:
        name = next((k for k in names if k in f.keys()), None)
        if name is None:
            raise ValueError(f"{file} has no token embedding (looked for {', '.join(names)})")
        return int(f.get_slice(name).get_shape()[0])


class KeepBest:
    """Keeps, in ``directory``, the checkpoint with the lowest ``metric`` offered so far (weights only).

    A resumed run continues the record of the checkpoint already there.
    """

    def __init__(self, directory: Path, metric: str) -> None:
        self.directory, self.metric = Path(directory), metric
        found = latest_checkpoint(self.directory)
        self.best: float | None = None if found is None else float(read_json(found / _COMPLETE)[metric])

    def offer(self, step: int, model: nn.Module, value: float, config: Mapping[str, Any]) -> bool:
        """Save ``model`` if ``value`` beats the record; True when it did."""
        if self.best is not None and not value < self.best:
            return False
        self.best = value
        save_checkpoint(self.directory, step, model=model, optimizer={}, rng={}, state={self.metric: value},
                        config=dict(config), keep_last=1)
        return True


def newest_readable(run_dir: Path, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """The newest checkpoint of ``run_dir`` that ``load`` can read, newest first; each unreadable one is named.

    A checkpoint torn after it was marked complete (a disk error, a copy cut short) is skipped with
    a warning, so a run resumes from the one before it; none is deleted.
    """
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    candidates = [latest] + [c for c in reversed(list_checkpoints(run_dir)) if c != latest]
    problems = []
    for found in candidates:
        try:
            verify_checkpoint(found)
            return found, load(found)
        except (CorruptFile, FileNotFoundError) as err:
            problems.append(str(err))
            warnings.warn(f"checkpoint {found} cannot be read: {err}; trying the one before it", stacklevel=2)
    raise CorruptFile(f"no checkpoint of {run_dir} can be read: " + "; ".join(problems))

"""The shared base of every recipe: what a paper task has in common, written once.

A recipe is a :class:`Recipe` subclass holding only what is its own: its typed config, its
model, its batches, its main loss (:meth:`Recipe.step`), its evaluation sizes and metric
(:meth:`Recipe.eval_plan`, :meth:`Recipe.eval_size`, :meth:`Recipe.eval_table`). The base owns
the rest:

- the training step around the recipe's forward: the random start shift of App. A.5 (one shift
  per step, with the space's ``shift.prob``), the PE's auxiliary loss (SeqPE's α·L_δ + β·L_OOD,
  Eq. 15) and its logs;
- the :class:`~seqpe_nd.tasks.engine.trainer.TrainTask` bookkeeping (no-decay groups, the
  resolved config saved with every checkpoint, the sections that must match on resume);
- loading a trained run (config, checkpoint, the check that the checkpoint fits the config);
- the evaluation skeleton: options checked before anything loads, sizes → rows, ``eval.json``,
  a table, figures; and the comparison of several evaluated runs.
"""

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from seqpe_nd.encodings import PEDraws, draws_of, pe_metrics
from seqpe_nd.positions import GridSpace, HybridSpace
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import (
    file_times,
    files_changed,
    fmt,
    fmt_spread,
    load_weights_checked,
    mean_std,
    merge_results,
    pick_device,
    print_table,
    read_result,
    read_run_config,
    reject_unknown_options,
    relative_to,
    write_result,
    written_note,
)
from seqpe_nd.tasks.engine.trainer import STRICT_SECTIONS, derive_seed, first_sample, unwrap
from seqpe_nd.tasks.recipes.config import RunConfig

ConfigT = TypeVar("ConfigT", bound=RunConfig)
R = TypeVar("R", bound="Recipe[Any]")
EVAL_PNG = "eval.png"


class StepOutput(NamedTuple):
    """What a recipe's forward on one training batch returns to :meth:`Recipe.loss`."""

    main: Tensor
    """The recipe's own loss (0-dim)."""
    pe_aux_loss: Tensor | None
    """The PE's auxiliary loss, None when it has none."""
    pe_logs: Mapping[str, Any] | None
    """The PE's training logs (SeqPE: ``loss_delta``, ``loss_ood``, ``loss_reg``, ``pe_spread``, ``pe_cos``)."""
    metrics: dict[str, float | Tensor] = {}
    """Extra metrics of the recipe (e.g. ``train_top1``)."""


@dataclass
class EvalPlan:
    """What one evaluation will do, fixed (and checked) before the model loads."""

    sizes: list[Any]
    """Evaluation sizes (lengths, resolutions, (frames, pixels) pairs ...), one row each."""
    header: dict[str, Any] = field(default_factory=dict)
    """Fields of ``eval.json`` besides the rows (split, training size, ...)."""
    checkpoint: Path | None = None
    """The checkpoint to load; None: the run's latest complete one."""
    context: dict[str, Any] = field(default_factory=dict)
    """Whatever the recipe's ``eval_size`` needs (the token stream, the image source, ...)."""


class Recipe(ABC, Generic[ConfigT]):
    """One paper task: a TrainTask for the shared loop, and the evaluation of its trained runs."""

    task: ClassVar[str]
    """The ``task:`` value of its configs."""
    config_type: ClassVar[type[RunConfig]]
    strict_sections: ClassVar[tuple[str, ...]] = STRICT_SECTIONS
    """Config sections a checkpoint must match to be resumed or evaluated."""
    main_loss: ClassVar[str] = "loss"
    """Name under which the main loss is logged."""
    no_decay_names: ClassVar[tuple[str, ...]] = ()
    """Parameters trained without weight decay besides biases, norms and every PE parameter."""
    rows_key: ClassVar[str] = "sizes"
    """Key of the per-size rows in ``eval.json``."""
    metric: ClassVar[tuple[str, str]] = ("top1", "top-1 %")
    """(row field, label) compared across runs."""
    constructor_options: ClassVar[tuple[str, ...]] = ()
    """Options of :meth:`evaluate` that go to the recipe's constructor (QA: ``documents``), not to its eval section."""

    def __init__(self, cfg: ConfigT, run_dir: Path | None = None) -> None:
        self.cfg: ConfigT = cfg
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.space: GridSpace | HybridSpace = cfg.space

    @classmethod
    def build_task(cls: "type[R]", cfg: Any, run_dir: Path) -> "R":
        """The recipe's TrainTask for ``seqpe-nd train`` (a recipe may check more before training)."""
        return cls(cfg, run_dir)

    # --- the TrainTask the shared loop runs -------------------------------------------------------
    def prepare_data(self) -> None:
        """Open the data that may be out of reach (the Hugging Face hub, a folder) before the loop builds the
        model or writes the run directory; the loop calls it first. Recipes that load their data in the
        constructor (LM, QA) need nothing here."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh fp32 model on the CPU (the loop moves, compiles and DDP-wraps it)."""

    @abstractmethod
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> Any:
        """Micro-batch ``micro`` of ``step`` for ``rank``: a pure function of (seed, step, micro, rank, world)."""

    def first_sample(self, step: int, micro: int, rank: int, world: int) -> int:
        """Global number of this micro-batch's first sample (see :func:`~seqpe_nd.tasks.engine.trainer.first_sample`)."""
        t = self.cfg.train
        return first_sample(step, micro, rank, world, t.batch_size, t.grad_accum)

    @abstractmethod
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of the bare model (eval mode, no grad)."""

    @abstractmethod
    def batch_tokens(self, batch: Any) -> int:
        """Tokens (images, clips, examples) in a micro-batch, for throughput."""

    @abstractmethod
    def step(
        self, model: nn.Module, batch: Any, *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        """The recipe's forward and main loss on a training batch; ``shift`` (or None), one offset ``(rows, w)``
        per row, moves that row's positions; ``draws`` (or None) are the PE's random inputs for the forward
        (``pe_draws=``: SeqPE's regularizer positions), drawn on the host by :meth:`loss`."""

    @property
    def shift_space(self) -> GridSpace | HybridSpace:
        """The space whose shift settings apply (the one the PE sees)."""
        return self.cfg.space

    def shift_extent(self, model: nn.Module, batch: Any) -> list[int] | None:
        """The extent of this batch's positions per dim (None: the space's training extent)."""
        return None

    def batch_rows(self, batch: Any) -> int:
        """Rows (sequences, images, clips) of a micro-batch: the leading dim of its first tensor."""
        first = next(v for v in (batch.values() if isinstance(batch, Mapping) else batch) if isinstance(v, Tensor))
        return int(first.shape[0])

    def shift_pool(self, extent: list[int] | None) -> Tensor:
        """The run's pool of start offsets for regions of ``extent`` (App. A.5, ``shift.pool``): drawn once, from
        the run's seed alone, so a resumed run and every rank draw the same pool."""
        key = None if extent is None else tuple(extent)
        pools: dict[Any, Tensor] = self.__dict__.setdefault("_shift_pools", {})
        if key not in pools:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, 4))
            pools[key] = self.shift_space.shift_pool(g, extent)
        return pools[key]

    def loss(
        self, model: nn.Module, batch: Any, *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        """Main loss + the PE's auxiliary loss; a shifted step (App. A.5) gives each row a start offset, with
        ``shift.starts`` distinct starts a step drawn from the run's pool, as released. Every random draw from
        ``generator`` happens here, on the host, before the forward: the shift, then the PE's own (``draws_of``),
        so no generator enters a compiled forward."""
        z = None
        if self.cfg.random_shift:
            extent = self.shift_extent(model, batch)
            space = self.shift_space
            pool = self.shift_pool(extent) if space.shift.pool is not None else None
            shift = space.sample_shift(generator, extent, rows=self.batch_rows(batch), pool=pool)
            z = shift.z if shift.applied else None  # (rows, w)
        draws = draws_of(model, generator, shifted=z is not None)
        out = self.step(model, batch, shift=z, draws=draws)
        # 0-dim tensors, not floats: no device sync per micro-batch (the loop reads them when it logs)
        metrics: dict[str, float | Tensor] = {self.main_loss: out.main.detach(), "shifted": float(z is not None)}
        metrics.update(out.metrics)
        metrics.update(pe_metrics(out.pe_aux_loss, out.pe_logs))
        total = out.main if out.pe_aux_loss is None else out.main + out.pe_aux_loss
        return total, metrics

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """This recipe's own no-decay names (the loop adds the default rule: biases, norms, every PE parameter)."""
        return name in self.no_decay_names

    def config_dict(self) -> dict[str, Any]:
        """The resolved config (the space inline, never a path) saved with every checkpoint."""
        return self.cfg.model_dump(mode="json", exclude={"train"})

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        return next(unwrap(model).parameters()).device

    # --- a trained run --------------------------------------------------------------------------------
    @classmethod
    def from_run(cls: "type[R]", run_dir: Path, **kwargs: Any) -> "R":
        """The recipe of a training run, from the config the run saved."""
        return cls(cls.config_type.parse(read_run_config(run_dir)), run_dir, **kwargs)  # type: ignore[arg-type]

    def trained_checkpoint(self) -> Path:
        """The weights a trained run is loaded, evaluated and exported with unless told otherwise: its latest."""
        if self.run_dir is None:
            raise ValueError("a trained checkpoint needs the run directory (or pass a checkpoint)")
        return ckpt.resolve_checkpoint(self.run_dir)

    def load_trained(self, checkpoint: Path | None = None) -> nn.Module:
        """The model with a checkpoint's weights (default: :meth:`trained_checkpoint`), in eval mode.

        A checkpoint whose model, space or PE config differs from this recipe's raises a ValueError
        naming each differing field before any weight is loaded.
        """
        return load_weights_checked(
            self.build_model(), checkpoint or self.trained_checkpoint(), self.config_dict(), self.strict_sections,
            self.normalize_config,
        )

    def normalize_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved run config in today's form: fields added since it was written get their defaults, so a
        run saved by an earlier version still loads and resumes (a config that no longer parses is kept as is)."""
        try:
            today = self.config_type.parse({k: v for k, v in saved.items() if k != "train"}).model_dump(mode="json")
        except ValueError:
            return saved
        return {**today, **({"train": saved["train"]} if "train" in saved else {})}

    # --- evaluation: sizes -> rows -> eval.json, table, figures -------------------------------------------
    @abstractmethod
    def eval_plan(self) -> EvalPlan:
        """The sizes and settings of the evaluation ``cfg.eval`` describes; everything is checked here, before the
        model loads (:meth:`with_eval` applies an evaluation's options first)."""

    def with_eval(self: R, **options: Any) -> R:
        """This recipe with fields of its ``eval`` section overridden (see :meth:`RunConfig.with_eval`)."""
        other = copy.copy(self)
        other.cfg = self.cfg.with_eval(**options)
        return other

    @classmethod
    def eval_options(cls) -> tuple[str, ...]:
        """The options of :meth:`evaluate` besides ``device``, ``write``, ``quiet`` and ``reuse``: the eval section's
        fields (not its ``val_…`` ones) and the constructor's options."""
        return (*cls.config_type.eval_settings_type().option_names(), *cls.constructor_options)

    @abstractmethod
    def eval_size(self, model: nn.Module, size: Any, plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        """One row of the result: the metric at one size."""

    def size_key(self, size: Any) -> str:
        """The row's key in ``eval.json`` (``"2048"``, ``"8x64"``)."""
        return "x".join(map(str, size)) if isinstance(size, (tuple, list)) else str(size)

    @abstractmethod
    def eval_table(self, result: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        """(title, columns, cells) of the printed result."""

    def write_figures(self, result: dict[str, Any], model: nn.Module) -> None:
        """Figures of one evaluated run, next to ``eval.json`` (may add their names to ``result``)."""

    def reuse_result(self, plan: EvalPlan) -> dict[str, Any] | None:
        """A saved result that answers ``plan`` exactly, to return instead of evaluating again."""
        return None

    @classmethod
    def evaluate(
        cls, run_dir: Path, *, device: str = "auto", write: bool = True, quiet: bool = False, reuse: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """Evaluate a trained run at every size of its plan; writes ``eval.json`` (atomically) and figures.

        A saved ``eval.json`` measured alike (same checkpoint, PE and header) keeps the sizes this call does not
        re-measure: the file grows by merging; one measured otherwise is replaced, and the message says why.
        Returns this call's sizes. With ``reuse``, a saved ``eval.json`` that answers the same plan is returned
        instead. Unless ``quiet``, prints the table and the files written.
        """
        reject_unknown_options(cls.task, options, cls.eval_options())
        run_dir = Path(run_dir)
        built = {k: v for k, v in options.items() if k in cls.constructor_options and v is not None}
        recipe = cls.from_run(run_dir, **built).with_eval(**{k: v for k, v in options.items() if k not in built})
        plan = recipe.eval_plan()
        if reuse and (saved := recipe.reuse_result(plan)) is not None:
            return saved
        dev = pick_device(device)
        found = ckpt.resolve_checkpoint(plan.checkpoint if plan.checkpoint is not None else run_dir)
        model = recipe.load_trained(found).to(dev)
        rows: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        for size in plan.sizes:
            t = time.perf_counter()
            row = recipe.eval_size(model, size, plan, dev)
            rows[recipe.size_key(size)] = {**row, "seconds": time.perf_counter() - t}
        result = {
            "run_dir": str(run_dir),
            **plan.header,
            "pe": recipe.cfg.pe.model_dump(mode="json") if recipe.cfg.pe is not None else None,
            "weights": relative_to(found, run_dir),
            "device": str(dev),
            "seconds": time.perf_counter() - t0,
            cls.rows_key: rows,
        }
        if not quiet:
            print_table(*recipe.eval_table(result))
        if write:
            before = file_times(run_dir)
            same = [*plan.header, "pe", "weights"]
            result, kept, differ = merge_results(read_result(run_dir), result, rows_key=cls.rows_key, same=same)
            recipe.write_figures(result, model)
            write_result(run_dir, result)
            if not quiet:
                print(written_note(run_dir, files_changed(run_dir, before), kept, differ))
            result = {**result, cls.rows_key: rows}
        return result


    # --- several evaluated runs ------------------------------------------------------------------------
    @classmethod
    def summarize(cls, results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """One row per run: the metric at each size and their mean, with training and evaluation seconds."""
        key = cls.metric[0]
        rows: dict[str, dict[str, Any]] = {}
        for name, res in results.items():
            values = {k: v[key] for k, v in res[cls.rows_key].items()}
            rows[name] = {
                key: values,
                "avg": sum(values.values()) / len(values),
                **{k: res[k] for k in ("train_seconds", "eval_seconds") if k in res},
            }
        return rows

    @classmethod
    def summarize_seeds(cls, results: Mapping[Any, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
        """One row per run name over seeds: the metric's mean and sample std (n - 1) at each size (``std``) and of
        ``avg`` (``avg_std``), the mean training and evaluation seconds, and each seed's own row (``by_seed``).

        ``results`` maps each seed to its evaluated runs by name (as :meth:`summarize` takes them). Every name must
        have a run for every seed, evaluated at the same sizes: anything missing is a ValueError naming it, never a
        mean over fewer seeds (pass fewer seeds explicitly instead).
        """
        key = cls.metric[0]
        seeds = list(results)
        if not seeds:
            raise ValueError("summarize_seeds needs the runs of at least one seed")
        per_seed = {seed: cls.summarize(runs) for seed, runs in results.items()}
        names = list(dict.fromkeys(name for rows in per_seed.values() for name in rows))
        missing = [f"{name} (seed {seed})" for name in names for seed in seeds if name not in per_seed[seed]]
        if missing:
            raise ValueError(f"no evaluated run for {', '.join(missing)}: every run needs all seeds {seeds}; "
                             "finish those runs, or pass only the seeds that every run has")
        rows: dict[str, dict[str, Any]] = {}
        for name in names:
            mine = {seed: per_seed[seed][name] for seed in seeds}
            sizes = list(mine[seeds[0]][key])
            for seed, r in mine.items():
                if set(r[key]) != set(sizes):
                    raise ValueError(f"{name}: seed {seed} was evaluated at {list(r[key])}, seed {seeds[0]} at {sizes}")
            stats = {size: mean_std([float(r[key][size]) for r in mine.values()]) for size in sizes}
            avg, avg_std = mean_std([float(r["avg"]) for r in mine.values()])
            row: dict[str, Any] = {
                "seeds": seeds,
                key: {size: m for size, (m, _) in stats.items()},
                "std": {size: sd for size, (_, sd) in stats.items()},
                "avg": avg,
                "avg_std": avg_std,
            }
            for t in ("train_seconds", "eval_seconds"):
                if all(t in r for r in mine.values()):
                    row[t] = mean_std([float(r[t]) for r in mine.values()])[0]
            rows[name] = {**row, "by_seed": {str(seed): r for seed, r in mine.items()}}
        return rows

    @classmethod
    def print_summary(cls, rows: Mapping[str, Mapping[str, Any]], title: str, *, reference: str | None = None) -> str:
        """Print the comparison table and return it as Markdown.

        Rows of :meth:`summarize_seeds` show ``mean ± std`` cells; with ``reference`` (a size, e.g. the training
        length) a column gives the std there as a percentage of the mean.
        """
        key = cls.metric[0]
        sizes = list(dict.fromkeys(s for r in rows.values() for s in r[key]))
        if all(s.isdigit() for s in sizes):
            sizes.sort(key=int)
        timed = any("train_seconds" in r for r in rows.values())
        spread = any("std" in r for r in rows.values())
        relative = spread and reference is not None
        columns = ["method", *sizes, "avg", *([f"std % at {reference}"] if relative else []),
                   *(["train s", "eval s"] if timed else [])]
        cells = []
        for name, r in rows.items():
            std = r.get("std", {})
            row = [name, *(fmt_spread(r[key].get(s), std.get(s)) for s in sizes)]
            row.append(fmt_spread(r["avg"], r.get("avg_std")))
            if relative:
                m, sd = r[key].get(reference), std.get(reference)
                row.append(fmt(None if m is None or sd is None or m == 0 else 100.0 * sd / abs(m), 1))
            if timed:
                row += [f"{r.get('train_seconds', float('nan')):.0f}", f"{r.get('eval_seconds', float('nan')):.0f}"]
            cells.append(row)
        return print_table(title, columns, cells)

    @classmethod
    def plot_runs(cls, results: Mapping[str, Mapping[str, Any]], path: Path, *, title: str) -> Path:
        """The metric against evaluation size, one line per run."""
        from seqpe_nd.tasks.engine.plots import plot_metric

        key, label = cls.metric
        curves = {name: {k: v[key] for k, v in res[cls.rows_key].items()} for name, res in results.items()}
        return plot_metric(curves, path, title=title, xlabel="evaluation size", ylabel=label)

    @classmethod
    def write_comparison(
        cls, results: Mapping[str, Mapping[str, Any]], out: Path | None, *, title: str
    ) -> dict[str, dict[str, Any]]:
        """Print one table of several evaluated runs; with ``out``, write compare.json, .md and .png there."""
        import json

        rows = cls.summarize(results)
        md = cls.print_summary(rows, title)
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            payload = {"title": title, "rows": rows, "runs": results}
            ckpt.atomic_write_text(out / "compare.json", json.dumps(payload, indent=1) + "\n")
            ckpt.atomic_write_text(out / "compare.md", f"## {title}\n\n{md}")
            cls.plot_runs(results, out / "compare.png", title=title)
        return rows


def check_sizes(sizes: Sequence[Any], ok: Any, allowed: str, what: str = "evaluation size") -> None:
    """One ValueError listing every size that ``ok(size)`` rejects, and what is allowed."""
    bad = [list(s) if isinstance(s, tuple) else s for s in sizes if not ok(s)]
    if bad:
        raise ValueError(f"{what}(s) {bad} not allowed: {allowed}")

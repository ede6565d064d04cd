"""The one training loop every recipe shares (LM, QA, ViT, ...), read top to bottom.

A recipe supplies a :class:`TrainTask` (model, batches, loss, validation); the loop owns the
rest: device and precision, DDP under ``torchrun``, AdamW with no-decay groups, warmup and
decay, gradient accumulation and clipping, logging, validation and atomic checkpoints that
resume exactly (same batches, same dropout masks, same losses).

Exact resume rests on two rules. Batches are a pure function of
``(seed, step, micro, rank, world)`` (:meth:`TrainTask.train_batch`), so the data position is
just the step. Every random draw of a step comes from torch's global RNG or the ``generator``
handed to :meth:`TrainTask.loss`; both are checkpointed for every rank.
"""

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from seqpe_nd.encodings import PositionEncoding
from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.clipping import clip_gradients, split_for_clipping
from seqpe_nd.tasks.engine.collapse import CollapseWatch
from seqpe_nd.tasks.engine.param_groups import default_no_weight_decay, param_groups
from seqpe_nd.tasks.engine.metrics_log import append_jsonl, truncate_metrics
from seqpe_nd.tasks.engine.distributed import all_mean, gather_rng, maybe_no_sync, restore_rng, setup_distributed

# Config sections that must match exactly when resuming: a different model cannot continue.
STRICT_SECTIONS: tuple[str, ...] = ("task", "model", "space", "pe")
METRICS = "metrics.jsonl"


@runtime_checkable
class TrainTask(Protocol):
    """What the shared loop needs from a recipe."""

    def build_model(self) -> nn.Module:
        """A fresh fp32 model on CPU; the loop moves, compiles and DDP-wraps it."""
        ...

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> Any:
        """Micro-batch ``micro`` of ``step`` for ``rank``: a pure function of (seed, step, micro, rank, world).

        Tensors anywhere inside (dicts, lists, tuples) are moved to the device by the loop.
        """
        ...

    def loss(
        self, model: nn.Module, batch: Any, *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        """Total loss (main + any PE regularizer) and metrics to log.

        Metrics may be floats or 0-dim tensors; tensors spare a device sync per micro-batch (the
        loop reads them only when it logs, averaged over micro-batches and ranks).

        ``model`` may be DDP- or compile-wrapped: call ``model(...)`` for the forward and reach
        submodules through :func:`unwrap`. ``generator`` is this rank's checkpointed RNG, a host (CPU)
        generator on every device: SeqPE's regularizer samplers and the shift draw run on the host,
        so a GPU step waits on none of their reads, and their small sets are copied to the device.
        Every trainable parameter must get a gradient each step (DDP); freeze the ones that do not.
        """
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of the bare model (eval mode, no grad); never uses the training sampler."""
        ...

    def batch_tokens(self, batch: Any) -> int:
        """Tokens (images for vision) in a micro-batch, for throughput."""
        ...

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """True for parameters the task trains without weight decay beyond the default rule (biases, norms and
        every PositionEncoding parameter: ``param_groups.default_no_weight_decay``), e.g. a prefix token's embedding."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """The full resolved run config; saved with every checkpoint."""
        ...

    strict_sections: tuple[str, ...]  # what a resumed checkpoint's config must match: STRICT_SECTIONS (+ a recipe's)

    def normalize_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's saved config in today's form (fields added since get their defaults) before comparing."""
        ...

    def prepare_data(self) -> None:
        """Open data that may be out of reach (the hub, a folder), before the loop builds the model or writes."""
        ...


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainConfig(Frozen):
    """Optimisation and bookkeeping of one training run (the ``train:`` section of a recipe YAML)."""

    steps: int = Field(1000, ge=0)
    """Optimizer steps in total."""
    batch_size: int = Field(8, ge=1)
    """Sequences (images) per micro-batch per device."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay (not applied where the task's ``no_weight_decay`` says so)."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to ``lr`` over this many steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup down to ``min_lr_ratio * lr`` at ``steps``."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of ``lr``."""
    clip_grad: float = Field(1.0, ge=0)
    """Max gradient norm of the model (of all of it unless ``clip_grad_pe`` is set); 0 disables clipping."""
    clip_grad_pe: float | None = Field(None, ge=0)
    """Clip a position encoding's own network (SeqPE's encoder) on its own gradient norm at this value, and
    the rest of the model at ``clip_grad``, as the released code does (both at 5: text ``train.py``, images
    ``main.py``); 0 leaves that network unclipped; None (default): one norm over every parameter. Methods
    without such a network are unaffected."""
    seed: int = 0
    """Seeds model init, data order and every RNG of the loop."""
    log_every: int = Field(10, ge=1)
    """Steps between training-metric lines in ``metrics.jsonl``."""
    eval_every: int = Field(0, ge=0)
    """Steps between validations; 0 validates only at the end."""
    save_every: int = Field(0, ge=0)
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = Field(2, ge=0)
    """Checkpoints kept (newest first); 0 keeps all."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (the training forward; validation runs the bare model)."""
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    """``torch.compile``'s backend: inductor (fused kernels); aot_eager / eager only trace (checks, in seconds)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available."""


def first_sample(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Global number of the first sample of micro-batch ``micro`` of ``step`` on ``rank``.

    Samples of a step are numbered ``((step * grad_accum + micro) * world + rank) * batch_size + j``, so a
    recipe's batches are a pure function of the step (exact resume) and no two ranks or micro-batches share one.
    """
    return ((step * grad_accum + micro) * world + rank) * batch_size


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the decay schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * shape


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (so rank 1's stream is not rank 0's shifted by one)."""
    words = np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


def run_dir_has_content(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything (a file in its place is an error: runs are folders)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file; give a folder (new or a run to --resume)")
    return run_dir.exists() and any(run_dir.iterdir())


def logs_at(done: int, cfg: TrainConfig) -> bool:
    """Whether the step that brings the count to ``done`` writes training logs."""
    return done % cfg.log_every == 0 or done == cfg.steps


def _check_every_param_learns(model: nn.Module, world: int) -> None:
    """DDP needs a gradient for every trainable parameter each step; say which have none, early."""
    idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not idle:
        return
    msg = (
        f"{len(idle)} trainable parameters received no gradient in the first step: {', '.join(idle[:8])}"
        f"{' ...' if len(idle) > 8 else ''}; freeze them (requires_grad=False) or remove them from the model"
    )
    if world > 1:  # DDP would stall or fail on the next forward with a less helpful message
        raise ValueError(msg)
    warnings.warn(msg + " (multi-process DDP runs refuse this)", stacklevel=3)


# --- the loop ----------------------------------------------------------------------------------------

TIMING = "train_seconds.json"


def train_or_reuse(
    build: Callable[[], TrainTask], cfg: TrainConfig, run_dir: Path, *, config: dict[str, Any] | None = None
) -> float:
    """Train the run in ``run_dir`` to ``cfg.steps`` (resuming an interrupted one) and return its training seconds.

    A finished run is reused without building its task when it was trained from the same ``config``
    (the raw run config, recorded in ``train_seconds.json``); its seconds are the ones recorded when it
    finished, so benchmarks can be rerun and continue where they stopped. A finished run of another
    config is not reused: resuming it fails on the sections that must match, naming them.
    """
    run_dir = Path(run_dir)
    timing = run_dir / TIMING
    latest = ckpt.latest_checkpoint(run_dir)
    finished = latest is not None and ckpt.read_json(latest / "state.json")["step"] >= cfg.steps
    saved = ckpt.read_json(timing) if finished and timing.is_file() else None
    if saved is not None and saved.get("config", config) == config:  # no "config": recorded before it was kept
        return float(saved["seconds"])
    t0 = time.perf_counter()
    train(build(), cfg, run_dir, resume=True)  # a finished run of another config: refused, or nothing to do
    seconds = time.perf_counter() - t0 if saved is None else float(saved["seconds"])
    if saved is None and (done := ckpt.latest_checkpoint(run_dir)) is not None:  # an interrupted run: all its parts
        seconds = float(ckpt.read_json(done / "state.json").get("elapsed_seconds", seconds))
    ckpt.atomic_write_text(timing, json.dumps({"seconds": seconds, "config": config}) + "\n")
    return seconds


def build_optimizer(model: nn.Module, task: TrainTask, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """The run's AdamW on the bare ``model``: :func:`param_groups` (the function a user's own optimizer calls) with
    its default no-decay rule (biases, norms, every PositionEncoding parameter) widened by the task's own, at
    ``cfg.lr``; the loop sets each group's rate to ``rate * lr_scale`` per step."""
    default = default_no_weight_decay(model)
    groups = param_groups(model, cfg.lr, cfg.weight_decay,
                          no_weight_decay=lambda name, p: default(name, p) or task.no_weight_decay(name, p))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def train(task: TrainTask, cfg: TrainConfig, run_dir: Path, *, resume: bool = False) -> dict[str, float]:
    """Train ``task`` for ``cfg.steps`` optimizer steps, writing metrics and checkpoints to ``run_dir``.

    With ``resume``, continue from the run's latest checkpoint (or start afresh if it has none);
    without it, a non-empty ``run_dir`` is refused so nothing written before is lost. Returns the
    last training metrics (``train/…``) and validation metrics (``val/…``) with ``step``.

    Under ``torchrun`` it makes the process group (NCCL on CUDA, gloo on CPU) and destroys it at
    the end; to call it more than once per process, make the group yourself first (torchrun's
    store cannot host a second default group after the first is destroyed).
    """
    run_dir = Path(run_dir)
    rank, world, device, owned_group = setup_distributed(cfg.device)
    master = rank == 0
    try:
        # Every rank checks before rank 0 writes anything, so all agree on what they saw.
        if not resume and run_dir_has_content(run_dir):
            raise ValueError(f"run directory {run_dir} is not empty; pass resume=True (--resume) or choose another")
        if world > 1:
            dist.barrier()
        task.prepare_data()  # data out of reach (the hub) fails here, before a model is built or a file written

        # --- precision ---
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        # --- model: identical init on every rank, then per-rank random streams ---
        torch.manual_seed(cfg.seed)
        raw = task.build_model().to(device)
        torch.manual_seed(derive_seed(cfg.seed, rank, 1))
        if device.type == "cuda":
            torch.cuda.manual_seed(derive_seed(cfg.seed, rank, 2))
        # On the host even on a GPU: the samplers' branching reads (nonzero, multinomial, bool) would each sync.
        generator = torch.Generator()
        generator.manual_seed(derive_seed(cfg.seed, rank, 3))

        model: nn.Module = torch.compile(raw, backend=cfg.compile_backend) if cfg.compile else raw
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        optimizer = build_optimizer(raw, task, cfg, fused=device.type == "cuda")

        # --- config and resume ---
        config = {**task.config_dict(), "train": cfg.model_dump(mode="json")}
        start, elapsed = 0, 0.0  # elapsed: training seconds of the parts of this run before a resume
        readable = ckpt.newest_readable(
            run_dir, lambda p: ckpt.load_checkpoint(p, expected_config=config, strict_sections=task.strict_sections,
                                                   normalize=task.normalize_config)
        ) if resume else None
        found = None
        if readable is not None:
            found, state = readable
            other = ckpt.diff_configs(config, state.config)
            if state.state["world"] != world:
                raise ValueError(
                    f"checkpoint {found} was written by {state.state['world']} processes, this run has {world}: "
                    "exact resume needs the same world size"
                )
            ckpt.load_weights(raw, found)
            optimizer.load_state_dict(state.optimizer)
            restore_rng(state.rng, generator, rank, device)
            start = state.step
            elapsed = float(state.state.get("elapsed_seconds", 0.0))
            if master:
                changed = f" (changed: {'; '.join(other)})" if other else ""
                tqdm.write(f"resuming {run_dir} from step {start}{changed}")
        if master:
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(run_dir / METRICS, start)
            ckpt.atomic_write_text(run_dir / "config.json", json.dumps(config, indent=1) + "\n")
            run_info = {
                "seed": cfg.seed, "world": world, "device": str(device), "bf16": bf16, "compile": cfg.compile,
                "torch": torch.__version__, "started_at_step": start,
                "rank_seeds": [[derive_seed(cfg.seed, r, i) for i in (1, 2, 3)] for r in range(world)],
            }
            ckpt.atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=1) + "\n")

        def evaluate(step: int) -> dict[str, float]:
            raw.eval()
            with torch.no_grad(), autocast:
                metrics = task.validate(raw)
            raw.train()
            if master:
                append_jsonl(run_dir / METRICS, {"step": step, "split": "val", **metrics})
                tqdm.write(f"step {step}: " + ", ".join(f"val/{k}={v:.4g}" for k, v in metrics.items()))
            return {f"val/{k}": v for k, v in metrics.items()}

        def save(step: int) -> None:
            rng = gather_rng(generator, rank, world, device)  # collective
            if master:
                ckpt.save_checkpoint(
                    run_dir, step, model=raw, optimizer=optimizer.state_dict(), rng=rng, config=config,
                    state={
                        "world": world, "seed": cfg.seed,
                        "data_position": {"step": step},  # batches are a pure function of the step
                        "scheduler": {"schedule": cfg.schedule, "next_lr": lr_at(step, cfg)},  # lr = lr_at(step)
                        "elapsed_seconds": elapsed + time.perf_counter() - loop_start,  # over every resume
                    },
                    keep_last=cfg.keep_last,
                )

        # --- the loop ---
        result: dict[str, float] = {"step": float(start)}
        raw.train()
        bar = tqdm(total=cfg.steps, initial=start, disable=not master, dynamic_ncols=True, desc="train")
        window_tokens, window_start = 0, time.perf_counter()
        loop_start = window_start
        encodings = [m for m in raw.modules() if isinstance(m, PositionEncoding)]
        clip_groups = split_for_clipping(raw, encodings, separate=cfg.clip_grad_pe is not None)
        collapse = CollapseWatch(cfg.warmup_steps, cfg.steps)
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            writes_logs = logs_at(step + 1, cfg)
            for pe in encodings:  # logs that cost compute (SeqPE's pe_cos) only on the steps that write logs
                pe.diagnostics = writes_logs
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            logs: dict[str, float | Tensor] = {}  # summed over micro-batches, read only when logging
            for micro in range(cfg.grad_accum):
                batch = move_to(task.train_batch(step, micro, rank, world), device)
                window_tokens += task.batch_tokens(batch) * world
                with maybe_no_sync(model, micro < cfg.grad_accum - 1), autocast:
                    loss, metrics = task.loss(model, batch, generator=generator)
                (loss / cfg.grad_accum).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    v = v.detach().float() if isinstance(v, Tensor) else float(v)
                    logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum

            if step == start:
                _check_every_param_learns(raw, world)
            grad_norm, grad_norm_pe = clip_gradients(clip_groups, cfg.clip_grad, cfg.clip_grad_pe)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if writes_logs:
                if grad_norm is not None:
                    logs["grad_norm"] = grad_norm  # identical on every rank after DDP's all-reduce
                if grad_norm_pe is not None:
                    logs["grad_norm_pe"] = grad_norm_pe
                means = all_mean(logs, world, device)  # the one device sync of a logging step
                tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                record = {"step": done, "split": "train", "lr": lr, "tokens_per_s": tps, **means}
                collapsed = collapse.update(step, means)  # same means on every rank: all agree
                if collapsed:
                    record["pe_collapsed"] = True  # an extra key of this train record: readers pick keys by name
                if master:
                    append_jsonl(run_dir / METRICS, record)
                    if collapsed:
                        tqdm.write(collapsed)
                    # pe_spread, not pe_cos: a shared mean holds pe_cos at 1.000 on a healthy encoder
                    pe = {k: f"{float(means[k]):.3f}" for k in ("loss_delta", "loss_ood", "pe_spread") if k in means}
                    bar.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}", **pe)
                result.update(
                    {f"train/{k}": float(v) for k, v in record.items() if k not in ("step", "split", "pe_collapsed")}
                )
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)

            pause = time.perf_counter()  # validation and saving do not count against tokens/s
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                result.update(evaluate(done))
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                save(done)
            window_start += time.perf_counter() - pause
            result["step"] = float(done)
        bar.close()
        if start >= cfg.steps and master:
            tqdm.write(f"{run_dir} already trained {start} of {cfg.steps} steps; nothing to do")
        if world > 1:  # every rank leaves together: none tears its process group down while rank 0 still saves
            dist.barrier()
        return result
    finally:
        if owned_group and dist.is_initialized():
            dist.destroy_process_group()

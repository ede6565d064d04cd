"""Language modelling with length extrapolation (§4.1, Table 1): GPT-2 + any position encoding.

``build_task(config, run_dir)`` is the recipe the shared training loop runs: packed blocks of
``model.block_size`` tokens, the random start shift of Appendix A.5 (with the space's
``shift.prob`` a whole step uses shifted positions), and the PE's auxiliary loss (SeqPE's
α·L_δ + β·L_OOD, Eq. 15) added to the cross entropy.

``evaluate(run_dir, lengths=...)`` is the protocol of §4.1: the split is cut into
non-overlapping chunks of each length (the last full chunk included), each chunk is one
sequence starting at position 0, batch 1, and perplexity is ``exp(Σ loss / Σ tokens)`` over
the chunks' next-token predictions. It writes ``eval.json`` (atomically) and ``eval.png``.

Legend: b batch, n tokens.
"""

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from torch import Tensor, nn
from transformers import GPT2Config

from seqpe_nd.encodings import APESinConfig, PEConfig, SeqPEConfig, build_position_encoding, pe_metrics
from seqpe_nd.positions import GridSpace, HybridSpace, load_space
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON as EVAL_JSON, write_result
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE
from seqpe_nd.tasks.data.text import TextCorpus, TextDataConfig, first_sample, prepare_text, sample_blocks
from seqpe_nd.tasks.engine.trainer import TrainConfig, unwrap

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_PNG = "eval.png"
# Sections that must match between a checkpoint and the model it is loaded into.
STRICT_SECTIONS: tuple[str, ...] = ("task", "model", "space", "pe")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class GPT2Settings(_Section):
    """The GPT-2 backbone (``model:``); the vocabulary comes from the tokenizer."""

    n_layer: PositiveInt = 12
    """Transformer blocks."""
    n_head: PositiveInt = 12
    """Attention heads per block."""
    n_embd: PositiveInt = 768
    """Model width; divisible by n_head."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Residual, embedding and attention dropout (the paper: 0.1)."""
    block_size: PositiveInt = 512
    """Training length L in tokens; must equal the position space's L."""
    init_std: float = Field(0.02, gt=0.0)
    """Std of GPT-2's normal weight init (``initializer_range``)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "GPT2Settings":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd = {self.n_embd} must be divisible by n_head = {self.n_head}")
        return self


class EvalSettings(_Section):
    """Length-extrapolation evaluation (``eval:``) and the validation run during training."""

    lengths: list[PositiveInt] | None = None
    """Chunk lengths to report; default 1, 2, 4, 8 and 16 times block_size."""
    split: Literal["train", "validation", "test"] = "test"
    """Split ``seqpe-nd eval`` reads by default (the paper: test)."""
    max_tokens: PositiveInt | None = None
    """Evaluate only the first chunks covering at most this many tokens per length; None = the whole split."""
    val_blocks: PositiveInt = 64
    """Validation during training: the first this many block_size chunks of the validation split."""


class LMConfig(_Section):
    """A whole LM run: one YAML file with ``task: lm``."""

    task: Literal["lm"] = "lm"
    model: GPT2Settings = GPT2Settings()
    data: TextDataConfig = TextDataConfig()
    space: dict[str, Any] | str = "configs/positions/text-512.yaml"
    """Position space: a YAML path (relative to the working directory or the repository) or an inline mapping."""
    pe: PEConfig = Field(default_factory=SeqPEConfig)
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope, alibi, seqpe, ...)."""
    random_shift: bool = True
    """Shift a whole step's positions with the space's ``shift.prob`` (App. A.5). Off for APE baselines, which
    would otherwise train at positions they are meant to extrapolate to."""
    train: TrainConfig = TrainConfig()
    eval: EvalSettings = EvalSettings()


def resolve_path(path: str | Path) -> Path:
    """A config-relative file: as given, else relative to the working directory, else to the repository."""
    p = Path(path)
    for candidate in (p, Path.cwd() / p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"space file {str(path)!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def resolve_space(source: dict[str, Any] | str) -> GridSpace | HybridSpace:
    """The position space a config names (validated)."""
    return load_space(source if isinstance(source, dict) else resolve_path(source))


def parse_config(config: dict[str, Any] | LMConfig) -> LMConfig:
    """Validate a run config; errors name the dotted field path."""
    if isinstance(config, LMConfig):
        return config
    try:
        return LMConfig.model_validate(config)
    except ValidationError as err:
        from seqpe_nd.tasks.recipes import format_validation_error

        raise ValueError(format_validation_error(err)) from None


def gpt2_config(settings: GPT2Settings, *, vocab_size: int, eos_id: int) -> GPT2Config:
    """The stock ``GPT2Config`` of the backbone (``n_positions`` only documents the training length)."""
    return GPT2Config(
        vocab_size=vocab_size, n_positions=settings.block_size, n_embd=settings.n_embd, n_layer=settings.n_layer,
        n_head=settings.n_head, resid_pdrop=settings.dropout, embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout, initializer_range=settings.init_std,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def build_model(cfg: LMConfig, space: GridSpace | HybridSpace, *, vocab_size: int, eos_id: int) -> GPT2WithPE:
    """A randomly initialised GPT-2 whose positions come from ``cfg.pe``."""
    m = cfg.model
    pe_cfg = cfg.pe
    if isinstance(pe_cfg, APESinConfig) and pe_cfg.scale is None:
        # Sinusoid RMS (1/√2 per coordinate) matched to the N(0, init_std) token embeddings; see APESinConfig.scale.
        pe_cfg = pe_cfg.model_copy(update={"scale": m.init_std * math.sqrt(2.0)})
    pe = build_position_encoding(
        pe_cfg, space=space, num_heads=m.n_head, head_dim=m.n_embd // m.n_head, num_layers=m.n_layer, d_model=m.n_embd,
    )
    return GPT2WithPE(gpt2_config(m, vocab_size=vocab_size, eos_id=eos_id), pe)


# --- evaluation protocol (§4.1) ------------------------------------------------------------------

def chunk_starts(num_tokens: int, length: int, max_tokens: int | None = None) -> range:
    """Starts of the non-overlapping full chunks of ``length`` tokens (the last full chunk included).

    The released code iterates ``range(0, N - L, L)`` and so drops the last full chunk when ``L``
    divides ``N``; this keeps it. ``max_tokens`` keeps only the first chunks that fit in it.
    """
    if length < 2:
        raise ValueError(f"chunk length {length} is too short: a chunk needs at least 2 tokens to score one")
    count = num_tokens // length
    if max_tokens is not None:
        count = min(count, max_tokens // length)
    return range(0, count * length, length)


@torch.no_grad()
def chunk_loss(model: nn.Module, ids: Int[Tensor, "b n"]) -> tuple[float, int]:
    """Summed next-token cross entropy of sequences that start at position 0, and the tokens scored."""
    n = ids.shape[1]
    pos = torch.arange(n, device=ids.device).expand(ids.shape[0], n)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (b, n, v)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return float(loss), ids.shape[0] * (n - 1)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: np.ndarray | Tensor, length: int, *, max_tokens: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float | int]:
    """§4.1 on one token stream: chunks of ``length`` at positions 0…length-1, batch 1."""
    starts = chunk_starts(len(tokens), length, max_tokens)
    if len(starts) == 0:
        raise ValueError(f"the split has {len(tokens)} tokens, fewer than one chunk of {length}")
    total, scored = 0.0, 0
    for s in starts:
        ids = torch.as_tensor(np.asarray(tokens[s : s + length], dtype=np.int64), device=device)[None]
        loss, count = chunk_loss(model, ids)
        total, scored = total + loss, scored + count
    return {"chunks": len(starts), "tokens": scored, "loss": total / scored, "ppl": math.exp(total / scored)}


# --- the task the training loop runs --------------------------------------------------------------

class LMTask:
    """TrainTask of the LM recipe (see :class:`seqpe_nd.tasks.engine.trainer.TrainTask`)."""

    def __init__(self, cfg: LMConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.space = resolve_space(cfg.space)
        if not isinstance(self.space, GridSpace) or self.space.ndim != 1:
            raise ValueError(f"space: the LM recipe needs a 1-D grid space, got {self.space.kind} with width {self.space.width}")
        if self.space.L[0] != cfg.model.block_size:
            raise ValueError(
                f"space.L = {self.space.L[0]} must equal model.block_size = {cfg.model.block_size} (the training length)"
            )
        self.corpus: TextCorpus = prepare_text(cfg.data)
        self.num_train_blocks = self.corpus.num_blocks("train", cfg.model.block_size)

    # -- TrainTask ------------------------------------------------------------------------
    def build_model(self) -> GPT2WithPE:
        return build_model(self.cfg, self.space, vocab_size=self.corpus.tokenizer.vocab_size, eos_id=self.corpus.tokenizer.eos_id)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t = self.cfg.train
        first = first_sample(step, micro, rank, world, t.batch_size, t.grad_accum)
        idx = sample_blocks(self.num_train_blocks, first, t.batch_size, t.seed)
        return {"input_ids": self.corpus.blocks("train", idx, self.cfg.model.block_size)}

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        ids = batch["input_ids"]  # (b, n)
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device).view(1, n, 1).expand(b, n, 1)
        shifted = False
        if self.cfg.random_shift:
            shift = self.space.sample_shift(generator, extent=[n])
            if shift.applied:  # every sequence of the step moves by the same z (App. A.5)
                pos, shifted = self.space.apply_shift(pos, shift.z.to(ids.device)), True
        out = model(input_ids=ids, position_ids=pos, use_cache=False, pe_generator=generator, pe_shifted=shifted)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        metrics: dict[str, float | Tensor] = {"lm_loss": float(lm.detach()), "shifted": float(shifted)}
        total = lm
        if out.pe_aux_loss is not None:
            total = total + out.pe_aux_loss
        metrics.update(pe_metrics(out.pe_aux_loss, out.pe_logs))
        return total, metrics

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Perplexity on the first ``eval.val_blocks`` blocks of the validation split (positions 0…L-1)."""
        L = self.cfg.model.block_size
        device = next(unwrap(model).parameters()).device
        tokens = self.corpus.split("validation")
        if len(tokens) < L:
            return {}
        res = perplexity(model, tokens, L, max_tokens=self.cfg.eval.val_blocks * L, device=device)
        return {"loss": res["loss"], "ppl": res["ppl"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        # Biases, LayerNorms and every PE parameter (the SeqPE encoder trains without decay, App. A).
        return param.ndim < 2 or name.startswith("pe.")

    def config_dict(self) -> dict[str, Any]:
        out = self.cfg.model_dump(mode="json", exclude={"train"})
        out["space"] = self.space.model_dump(mode="json")  # resolved, so a run never depends on the file
        return out


def build_task(config: dict[str, Any], run_dir: Path) -> LMTask:
    """The recipe entry point (``task: lm``)."""
    return LMTask(parse_config(config), run_dir)


# --- method presets (``seqpe-nd compare --methods ...``) -------------------------------------------

_SHIFT = {"random_shift": True}
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "nope": {"pe": {"method": "nope"}, **_SHIFT},
    # The APE baselines train on positions 0…L-1 only: a shifted step would show them the very
    # positions the evaluation asks them to extrapolate to (APE-learn would stretch its table to L_max).
    "ape_sin": {"pe": {"method": "ape_sin"}, "random_shift": False},
    "ape_learn": {"pe": {"method": "ape_learn"}, "random_shift": False},
    "rope": {"pe": {"method": "rope", "base": 1e4}, **_SHIFT},
    "rope-1e6": {"pe": {"method": "rope", "base": 1e6}, **_SHIFT},
    "rope-1e8": {"pe": {"method": "rope", "base": 1e8}, **_SHIFT},
    "alibi": {"pe": {"method": "alibi"}, **_SHIFT},
    "seqpe": {"pe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "alpha": 0.1, "beta": 0.1}, **_SHIFT},
    # Table 4 ablation: α weighs L_δ, β weighs L_OOD.
    "seqpe-a0-b0": {"pe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "alpha": 0.0, "beta": 0.0}, **_SHIFT},
    "seqpe-a0.1-b0": {"pe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "alpha": 0.1, "beta": 0.0}, **_SHIFT},
    "seqpe-a0-b0.1": {"pe": {"method": "seqpe", "integration": "attn_bias", "per_layer": False, "alpha": 0.0, "beta": 0.1}, **_SHIFT},
}
"""Table 1's eight methods and Table 4's ablation, as overrides of a base run config."""


def apply_preset(config: dict[str, Any], name: str) -> dict[str, Any]:
    """``config`` with the preset's ``pe`` (keeping the base's options of the same method, e.g. SeqPE's width)."""
    if name not in METHOD_PRESETS:
        raise ValueError(f"unknown method preset {name!r}; allowed: {', '.join(METHOD_PRESETS)}")
    preset = METHOD_PRESETS[name]
    out = {**config, **{k: v for k, v in preset.items() if k != "pe"}}
    base_pe = dict(config.get("pe") or {})
    same = base_pe.get("method", "seqpe") == preset["pe"]["method"]
    out["pe"] = {**base_pe, **preset["pe"]} if same else dict(preset["pe"])
    return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per run: perplexity at each length and their mean (Table 1's AVG. column)."""
    rows = {}
    for name, res in results.items():
        ppl = {int(k): v["ppl"] for k, v in res["lengths"].items()}
        rows[name] = {"ppl": ppl, "avg": sum(ppl.values()) / len(ppl), **{k: res[k] for k in ("train_seconds", "eval_seconds") if k in res}}
    return rows


def _console() -> Any:
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)  # logs: wide enough for every column


def print_summary(rows: dict[str, dict[str, Any]], title: str) -> str:
    """Print the comparison table (rich) and return it as Markdown."""
    from rich.table import Table

    lengths = sorted({L for r in rows.values() for L in r["ppl"]})
    table = Table(title=title)
    header = ["method", *map(str, lengths), "avg"]
    timed = any("train_seconds" in r for r in rows.values())
    if timed:
        header += ["train s", "eval s"]
    for col in header:
        table.add_column(col, justify="left" if col == "method" else "right")
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, r in rows.items():
        cells = [name, *(_fmt(r["ppl"].get(L)) for L in lengths), _fmt(r["avg"])]
        if timed:
            cells += [f"{r.get('train_seconds', float('nan')):.0f}", f"{r.get('eval_seconds', float('nan')):.0f}"]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    _console().print(table)
    return "\n".join(md) + "\n"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


# --- loading a trained run ---------------------------------------------------------------------------

def load_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a training run directory?")
    return json.loads(path.read_text())


def load_model(run_dir: Path, config: dict[str, Any] | LMConfig | None = None, *, task: LMTask | None = None) -> GPT2WithPE:
    """The trained model of a run, in eval mode; ``config`` (default the run's own) builds it.

    A checkpoint whose model, space or PE config differs from ``config`` raises a ValueError
    naming each differing field before any weight is loaded.
    """
    run_dir = Path(run_dir)
    found = ckpt.resolve_checkpoint(run_dir)
    if task is None:
        task = LMTask(parse_config(config if config is not None else load_run_config(run_dir)), run_dir)
    saved = json.loads((found / "config.json").read_text())
    ckpt.check_config(task.config_dict(), {k: v for k, v in saved.items() if k != "train"}, STRICT_SECTIONS)
    model = task.build_model()
    ckpt.load_weights(model, found)
    return model.eval()


def evaluate(
    run_dir: Path,
    *,
    lengths: Sequence[int] | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    write: bool = True,
    quiet: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """§4.1 perplexity of a trained run at each length; writes ``eval.json`` and ``eval.png``.

    With ``reuse``, an ``eval.json`` of the same checkpoint, split, lengths and token cap is
    returned instead of evaluating again.
    """
    run_dir = Path(run_dir)
    cfg = parse_config(load_run_config(run_dir))
    L = cfg.model.block_size
    lengths = list(lengths or cfg.eval.lengths or [L * f for f in (1, 2, 4, 8, 16)])
    split = split or cfg.eval.split
    max_tokens = max_tokens if max_tokens is not None else cfg.eval.max_tokens
    checkpoint = ckpt.resolve_checkpoint(run_dir).name
    if reuse and (run_dir / EVAL_JSON).is_file():
        saved = json.loads((run_dir / EVAL_JSON).read_text())
        same = (saved.get("checkpoint"), saved.get("split"), saved.get("max_tokens"), list(saved.get("lengths", {})))
        if same == (checkpoint, split, max_tokens, [str(x) for x in lengths]):
            return saved
    task = LMTask(cfg, run_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = load_model(run_dir, task=task).to(dev)
    tokens = task.corpus.split(split)
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for length in lengths:
        t = time.perf_counter()
        rows[str(length)] = {**perplexity(model, tokens, length, max_tokens=max_tokens, device=dev), "seconds": time.perf_counter() - t}
    result = {
        "run_dir": str(run_dir), "checkpoint": checkpoint, "split": split, "block_size": L, "max_tokens": max_tokens,
        "pe": cfg.pe.model_dump(mode="json"), "device": str(dev), "seconds": time.perf_counter() - t0, "lengths": rows,
    }
    if write:
        from seqpe_nd.tasks.engine.plots import plot_ppl

        write_result(run_dir, result)
        plot_ppl({run_dir.name: {int(k): v["ppl"] for k, v in rows.items()}}, run_dir / EVAL_PNG,
                 title=f"{run_dir.name}: perplexity vs length ({split}, trained at {L})", train_length=L)
    if not quiet:
        print_eval(result)
    return result


def print_eval(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['run_dir']} — {result['split']} perplexity (trained at {result['block_size']} tokens)")
    for col in ("length", "× train", "chunks", "tokens", "ppl", "seconds"):
        table.add_column(col, justify="right")
    for length, r in result["lengths"].items():
        table.add_row(length, f"{int(length) / result['block_size']:g}", str(r["chunks"]), str(r["tokens"]),
                      f"{r['ppl']:.2f}", f"{r['seconds']:.1f}")
    _console().print(table)

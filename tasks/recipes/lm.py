"""Language modelling with length extrapolation (§4.1, Table 1): GPT-2 + any position encoding.

Training: packed blocks of ``model.block_size`` tokens; the shared :class:`Recipe` step adds the
random start shift of App. A.5 and the PE's auxiliary loss (SeqPE's α·L_δ + β·L_OOD, Eq. 15).

Evaluation is the protocol of §4.1: the split is cut into non-overlapping chunks of each length
(the last full chunk included), each chunk is one sequence starting at position 0, batch 1, and
perplexity is ``exp(Σ loss / Σ tokens)`` over the chunks' next-token predictions.

Legend: b batch, n tokens.
"""

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, PEDraws, SeqPEConfig
from seqpe_nd.positions import GridSpace
from seqpe_nd.tasks.backbones.language_model import LMSettings, build_lm
from seqpe_nd.tasks.data.text import TextCorpus, TextDataConfig, prepare_text, sample_blocks
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import read_result
from seqpe_nd.tasks.recipes.base import EVAL_PNG, EvalPlan, Recipe, StepOutput, check_sizes
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SpaceField


class LMEvalSettings(EvalSettings):
    """Length-extrapolation evaluation (``eval:``) and the validation run during training."""

    lengths: list[PositiveInt] | None = None
    """Chunk lengths to report; default 1, 2, 4, 8 and 16 times block_size."""
    split: Literal["train", "validation", "test"] = "test"
    """Split ``seqpe-nd eval`` reads by default (the paper: test)."""
    max_tokens: PositiveInt | None = None
    """Evaluate only the first chunks covering at most this many tokens per length; None = the whole split."""
    val_blocks: PositiveInt = 64
    """Validation during training: the first this many block_size chunks of the validation split."""


class LMConfig(RunConfig):
    """A whole LM run: one YAML file with ``task: lm``."""

    task: Literal["lm"] = "lm"
    model: LMSettings = LMSettings()
    data: TextDataConfig = TextDataConfig()
    space: SpaceField = Field("configs/positions/text-512.yaml", validate_default=True)
    """1-D position space whose L is ``model.block_size``: inline, or a YAML path (see RunConfig.space)."""
    pe: PEConfig = Field(default_factory=SeqPEConfig)
    """Position encoding; ``method`` picks one (nope, ape_sin, ape_learn, rope, alibi, seqpe, ...)."""
    random_shift: bool = True
    """Shift a whole step's positions with the space's ``shift.prob`` (App. A.5). Off for APE baselines, which
    would otherwise train at positions they are meant to extrapolate to."""
    eval: LMEvalSettings = LMEvalSettings()

    @model_validator(mode="after")
    def _space_fits(self) -> "LMConfig":
        space = self.grid_space(1)
        if space.L[0] != self.model.block_size:
            raise ValueError(
                f"space.L = {space.L[0]} must equal model.block_size = {self.model.block_size} (the training length)"
            )
        if self.model.arch == "gpt2_stock" and (self.pe.method != "nope" or self.random_shift):
            raise ValueError(
                "model.arch = gpt2_stock keeps GPT-2's own learned wpe as its position encoding: it needs "
                f"pe: {{method: nope}} (got {self.pe.method!r}) and random_shift: false (got {self.random_shift}), "
                "as for ape_learn: shifted steps would train the rows it is meant to extrapolate to"
            )
        return self


def config_lengths(cfg: LMConfig) -> list[int]:
    """The config's evaluation lengths: ``eval.lengths``, else 1, 2, 4, 8 and 16 times block_size."""
    return list(cfg.eval.lengths or [cfg.model.block_size * f for f in (1, 2, 4, 8, 16)])


def stock_positions(cfg: LMConfig) -> int | None:
    """Rows of the stock GPT-2's learned ``wpe`` (``model.arch: gpt2_stock``): the config's longest evaluation
    length, so it evaluates there with the rows past block_size at their init; None for the other models."""
    return max(config_lengths(cfg)) if cfg.model.arch == "gpt2_stock" else None


def build_model(cfg: LMConfig, *, vocab_size: int, eos_id: int) -> nn.Module:
    """A randomly initialised GPT-2 whose positions come from ``cfg.pe``."""
    return build_lm(cfg.model, cfg.pe, cfg.grid_space(1), vocab_size=vocab_size, eos_id=eos_id,
                    max_positions=stock_positions(cfg))


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


def eval_settings(cfg: LMConfig, trained: LMConfig) -> tuple[list[int], str, int | None]:
    """(lengths, split, max_tokens) of the evaluation ``cfg.eval`` describes (an evaluation's options applied to
    ``trained``'s, see :meth:`RunConfig.with_eval`), each one checked against the model ``trained`` builds."""
    e = cfg.eval
    sizes = list(config_lengths(cfg))
    check_sizes(sizes, lambda n: n >= 2, "lengths are whole numbers of tokens >= 2", "length")
    if (rows := stock_positions(trained)) is not None:
        check_sizes(sizes, lambda n: n <= rows, f"the stock GPT-2 learned {rows} positions (its wpe rows, the "
                    "config's longest eval.lengths): lengths <= that", "length")
    split, max_tokens = e.split, e.max_tokens
    if max_tokens is not None and max_tokens < max(sizes):
        raise ValueError(f"max_tokens = {max_tokens} is fewer than one chunk of {max(sizes)}; allowed: >= the longest length")
    return sizes, split, max_tokens


# --- the recipe -------------------------------------------------------------------------------------

class LMRecipe(Recipe[LMConfig]):
    """GPT-2 language modelling; evaluated by perplexity at longer contexts."""

    task = "lm"
    config_type = LMConfig
    main_loss = "lm_loss"
    rows_key = "lengths"
    metric = ("ppl", "perplexity")
    no_decay_names = ("transformer.wpe.weight",)  # the stock GPT-2's position table trains as APE-learn's does

    def __init__(self, cfg: LMConfig, run_dir: Path | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.trained_cfg = cfg  # the model's config: an evaluation's options (with_eval) never resize the stock wpe
        self.space: GridSpace = cfg.grid_space(1)
        self.corpus: TextCorpus = prepare_text(cfg.data)
        self.num_train_blocks = self.corpus.num_blocks("train", cfg.model.block_size)

    def build_model(self) -> nn.Module:
        tok = self.corpus.tokenizer
        return build_model(self.trained_cfg, vocab_size=tok.vocab_size, eos_id=tok.eos_id)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t = self.cfg.train
        first = self.first_sample(step, micro, rank, world)
        idx = sample_blocks(self.num_train_blocks, first, t.batch_size, t.seed)
        return {"input_ids": self.corpus.blocks("train", idx, self.cfg.model.block_size)}

    def shift_extent(self, model: nn.Module, batch: dict[str, Tensor]) -> list[int]:
        return [batch["input_ids"].shape[1]]

    def step(
        self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        ids = batch["input_ids"]  # (b, n)
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device).view(1, n, 1).expand(b, n, 1)
        if shift is not None:  # each row starts at its own z (App. A.5)
            pos = self.space.apply_shift(pos, shift.to(ids.device, non_blocking=True)[:, None])
        out = model(input_ids=ids, position_ids=pos, use_cache=False, pe_draws=draws, pe_shifted=shift is not None)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return StepOutput(lm, out.pe_aux_loss, out.pe_logs)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Perplexity on the first ``eval.val_blocks`` blocks of the validation split (positions 0…L-1)."""
        L = self.cfg.model.block_size
        tokens = self.corpus.split("validation")
        if len(tokens) < L:
            return {}
        res = perplexity(model, tokens, L, max_tokens=self.cfg.eval.val_blocks * L, device=self.device_of(model))
        return {"loss": res["loss"], "ppl": res["ppl"]}

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].numel())

    # -- evaluation -------------------------------------------------------------------------------
    def eval_plan(self) -> EvalPlan:
        sizes, split, max_tokens = eval_settings(self.cfg, self.trained_cfg)
        L = self.cfg.model.block_size
        assert self.run_dir is not None
        found = ckpt.resolve_checkpoint(self.run_dir)
        header = {"checkpoint": found.name, "split": split, "block_size": L, "max_tokens": max_tokens}
        return EvalPlan(sizes, header, found, {"tokens": self.corpus.split(split)})

    def reuse_result(self, plan: EvalPlan) -> dict[str, Any] | None:
        """The saved result when it measured every length of ``plan`` alike (only those lengths are returned)."""
        assert self.run_dir is not None
        saved = read_result(self.run_dir)  # None when missing or torn: evaluated again (and rewritten atomically)
        if saved is None:
            return None
        h, lengths = plan.header, [str(x) for x in plan.sizes]
        same = (saved.get("checkpoint"), saved.get("split"), saved.get("max_tokens")) == (h["checkpoint"], h["split"], h["max_tokens"])
        rows = saved.get("lengths", {})
        return {**saved, "lengths": {k: rows[k] for k in lengths}} if same and set(lengths) <= set(rows) else None

    def eval_size(self, model: nn.Module, size: int, plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        return perplexity(model, plan.context["tokens"], size, max_tokens=plan.header["max_tokens"], device=device)

    def write_figures(self, result: dict[str, Any], model: nn.Module) -> None:
        from seqpe_nd.tasks.engine.plots import plot_ppl

        assert self.run_dir is not None
        name, L = self.run_dir.name, result["block_size"]
        plot_ppl({name: {int(k): v["ppl"] for k, v in result["lengths"].items()}}, self.run_dir / EVAL_PNG,
                 title=f"{name}: perplexity vs length ({result['split']}, trained at {L})", train_length=L)

    def eval_table(self, result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        L = result["block_size"]
        title = f"{result['run_dir']} — {result['split']} perplexity (trained at {L} tokens)"
        cells = [[n, f"{int(n) / L:g}", str(r["chunks"]), str(r["tokens"]), f"{r['ppl']:.2f}", f"{r['seconds']:.1f}"]
                 for n, r in result["lengths"].items()]
        return title, ["length", "× train", "chunks", "tokens", "ppl", "seconds"], cells

    @classmethod
    def plot_runs(cls, results: Any, path: Path, *, title: str) -> Path:
        from seqpe_nd.tasks.engine.plots import plot_ppl

        blocks = {r["block_size"] for r in results.values()}
        curves = {name: {int(k): v["ppl"] for k, v in r["lengths"].items()} for name, r in results.items()}
        return plot_ppl(curves, path, title=title, train_length=blocks.pop() if len(blocks) == 1 else None)


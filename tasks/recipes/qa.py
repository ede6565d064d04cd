"""Long-context question answering (§4.2, Table 2): fine-tune an LM run on multi-document QA.

``build_task(config, run_dir)`` starts from the latest checkpoint of an LM run directory (``init_from``).
The QA config may restate the LM run's ``model``, ``space``, ``pe`` and ``lm_data`` (the tokenizer); what
it states must equal the LM run's, or the run is refused with every differing field named. Training sequences are Fig. 4 prompts of
``context_length`` tokens (default twice the LM's training length, as the paper's 1024 after 512),
right-padded, with the loss on the answer tokens and the end-of-text token only. Random start
shifts follow the LM run (``random_shift``), and a shifted step tells the PE so (SeqPE skips
L_OOD on it; the released QA code computed it on shifted steps). Validation is answer perplexity at
``context_length``; the best is kept in ``run_dir/best``, which evaluation and export read.

``evaluate(run_dir, lengths=...)`` asks the same questions at every length (default 1, 2, 4 and 8
times ``context_length``): answer perplexity over answer + EOS tokens, and 16 greedy tokens (KV cache,
left padding with explicit positions) scored by the paper's EM (the gold answer contained in the
lower-cased generation) and strict EM (equal to it); a table, ``eval.json`` and ``eval.png``.

Legend: b batch, n tokens, t generated tokens, v vocabulary.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from seqpe_nd.encodings import PEConfig, PEDraws, load_pe_config
from seqpe_nd.positions import GridSpace, load_space
from seqpe_nd.tasks.backbones.language_model import LMSettings, build_lm
from seqpe_nd.tasks.data.qa import (
    PromptBuilder,
    PromptTooLong,
    QADataConfig,
    QAExample,
    QASource,
    collate_prompts,
    collate_train,
    contains_match,
    decode_answer,
    make_example,
    strict_match,
)
from seqpe_nd.tasks.data.qa_sources import build_source
from seqpe_nd.tasks.data.text import (
    TextDataConfig,
    TextTokenizer,
    load_tokenizer,
    sample_blocks,
)
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.decoding import answer_loss, greedy_generate
from seqpe_nd.tasks.engine.evaluation import load_weights_checked, read_run_config
from seqpe_nd.tasks.engine.trainer import unwrap
from seqpe_nd.tasks.recipes.base import EVAL_PNG, EvalPlan, Recipe, StepOutput, check_sizes
from seqpe_nd.tasks.recipes.config import EvalSettings, RunConfig, SpaceField

BEST = "best"
"""Sub-directory of a QA run holding the checkpoint with the best validation answer perplexity."""
# Sections that must match an LM run (and, on resume or evaluation, the QA run's own checkpoint).
INHERITED: tuple[str, ...] = ("model", "space", "pe", "lm_data")
_NEXT_TRIES = 64  # training: an example too long for the budget gives way to the next index


class QAEvalSettings(EvalSettings):
    """Evaluation (``eval:``) and the validation run during training."""

    lengths: list[PositiveInt] | None = None
    """Context lengths (tokens) to report; default 1, 2, 4 and 8 times context_length."""
    split: Literal["validation", "test"] = "test"
    """Split ``seqpe-nd eval`` reads (embedded: held-out documents; SQuAD: its validation split)."""
    num_examples: PositiveInt = 100
    """Questions per length (the same questions at every length)."""
    max_tokens: PositiveInt | None = None
    """Cap on the prompt tokens per length: ``max_tokens // length`` questions (at least one); None: no cap."""
    max_new_tokens: PositiveInt = 16
    """Greedy tokens generated per question (the paper: 16)."""
    batch_tokens: PositiveInt = 8192
    """Sequences per evaluation batch = max(1, batch_tokens // length)."""
    val_examples: PositiveInt = 64
    """Validation during training: questions of the validation split at context_length."""
    checkpoint: Literal["best", "latest"] = "best"
    """Which weights ``evaluate`` loads: the best validation answer perplexity, or the last step."""


class QAConfig(RunConfig):
    """A whole QA fine-tuning run: one YAML file with ``task: qa``."""

    task: Literal["qa"] = "qa"
    init_from: Path
    """LM run directory whose latest checkpoint is fine-tuned."""
    init_checkpoint: str | None = None
    """Filled in by the recipe: the checkpoint directory actually loaded (provenance)."""
    model: LMSettings | None = None
    """None: the LM run's; given: must equal it."""
    space: SpaceField | None = None
    """None: the LM run's; given: must equal it (inline, or a YAML path as in RunConfig.space)."""
    pe: PEConfig | None = None
    """None: the LM run's; given: must equal it field by field."""
    lm_data: TextDataConfig | None = None
    """The LM run's ``data:`` section, which fixes the tokenizer. None: the LM run's; given: must equal it."""
    context_length: PositiveInt | None = None
    """Training token budget of a prompt + answer + EOS; default 2 × the LM's block_size."""
    random_shift: bool | None = None
    """Random start shifts as in LM training (App. A.5); None: as the LM run."""
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Dropout while fine-tuning (a training setting, not architecture); None: the LM run's ``model.dropout``."""
    data: QADataConfig = QADataConfig()
    eval: QAEvalSettings = QAEvalSettings()

    @model_validator(mode="after")
    def _check(self) -> "QAConfig":
        if self.context_length is not None and self.context_length < 16:
            raise ValueError(f"context_length = {self.context_length} cannot hold Fig. 4's template (need >= 16)")
        return self

    @property
    def resolved(self) -> bool:
        return None not in (self.model, self.space, self.pe, self.lm_data, self.context_length, self.random_shift)


def _comparable(section: str, value: Any) -> Any:
    if value is None:
        return None
    dumped = value.model_dump(mode="json")
    if section == "lm_data":
        dumped.pop("cache_dir", None)  # where the cache lives does not change the tokenizer
    return dumped


def read_lm_run(init: Path) -> tuple[Path, dict[str, Any]]:
    """The latest checkpoint of an LM run and the sections a QA run inherits from it (typed)."""
    if not (init / "config.json").is_file():
        raise FileNotFoundError(f"init_from: {init} has no config.json; it must be an LM training run directory")
    task = read_run_config(init).get("task")
    if task != "lm":
        raise ValueError(f"init_from: {init} is a {task!r} run; allowed: an 'lm' run")
    found = ckpt.latest_checkpoint(init)
    if found is None:
        raise FileNotFoundError(f"init_from: no complete checkpoint in {init}")
    raw = ckpt.read_json(found / "config.json")
    sections = {
        "model": LMSettings.model_validate(raw["model"]),
        "space": load_space(raw["space"]),
        "pe": load_pe_config(raw["pe"]),
        "lm_data": TextDataConfig.model_validate(raw["data"]),
        "random_shift": bool(raw.get("random_shift", True)),
    }
    if sections["model"].arch == "gpt2_stock":  # its wpe has the LM run's evaluation lengths, not the QA contexts
        raise ValueError(f"init_from: {init} is a gpt2_stock run (Table 1's stock GPT-2 control); "
                         "allowed: LM runs of arch gpt2 or llama")
    return found, sections


def resolve_config(cfg: QAConfig) -> QAConfig:
    """Fill the inherited sections from the ``init_from`` LM run; refuse any stated one that differs.

    Raises a ValueError naming each differing field (``pe.base: LM run has 10000.0, config has 1000000.0``).
    """
    init = Path(cfg.init_from)
    found, theirs = read_lm_run(init)
    if cfg.dropout is not None:  # a stated model section (e.g. this run's own, on resume) carries it already
        theirs["model"] = theirs["model"].model_copy(update={"dropout": cfg.dropout})
    diffs: list[str] = []
    for section in INHERITED:
        mine = getattr(cfg, section)
        if mine is None:
            continue
        a, b = _comparable(section, mine), _comparable(section, theirs[section])
        diffs += [d.replace("checkpoint has", "LM run has") for d in ckpt.diff_configs({section: a}, {section: b})]
    if diffs:
        raise ValueError(f"init_from: {init} does not match this config: " + "; ".join(diffs))
    return cfg.model_copy(update={
        "init_checkpoint": str(found.resolve()),
        **{s: theirs[s] for s in INHERITED},
        "context_length": cfg.context_length or 2 * theirs["model"].block_size,
        "random_shift": theirs["random_shift"] if cfg.random_shift is None else cfg.random_shift,
    })


@torch.no_grad()
def score_examples(
    model: nn.Module,
    examples: Sequence[QAExample],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    max_new_tokens: int | None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Answer perplexity (and with ``max_new_tokens``, greedy generations and both EMs) over ``examples``."""
    total, count = 0.0, 0
    em = strict = 0
    samples: list[dict[str, Any]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate_train(chunk, tokenizer.eos_id)
        loss, n, _ = answer_loss(model, batch["input_ids"].to(device), batch["labels"].to(device))
        total, count = total + float(loss), count + n
        if max_new_tokens is None:
            continue
        prompts = {k: v.to(device) for k, v in collate_prompts(chunk, tokenizer.eos_id).items()}
        gen = greedy_generate(model, **prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id).tolist()
        for e, g in zip(chunk, gen, strict=True):
            text = decode_answer(tokenizer, g)
            hit, exact = contains_match(text, e.answers), strict_match(text, [e.target])
            em, strict = em + hit, strict + exact
            samples.append({"id": e.id, "answers": list(e.answers), "generation": text, "em": hit, "strict_em": exact,
                            "depth": e.depth, "num_docs": len(e.documents), "tokens": e.num_tokens})
    out: dict[str, Any] = {"examples": len(examples), "answer_tokens": count, "loss": total / max(count, 1),
                           "ppl": math.exp(total / max(count, 1))}
    if max_new_tokens is not None:
        out.update({"em": 100.0 * em / max(len(examples), 1), "strict_em": 100.0 * strict / max(len(examples), 1),
                    "samples": samples})
    return out


# --- the recipe ------------------------------------------------------------------------------------

class QARecipe(Recipe[QAConfig]):
    """Fine-tuning an LM run on multi-document QA; evaluated by answer perplexity and EM at longer contexts."""

    task = "qa"
    config_type = QAConfig
    strict_sections = ("task", *INHERITED)
    main_loss = "answer_loss"
    constructor_options = ("documents",)
    rows_key = "lengths"
    metric = ("em", "EM %")

    def __init__(self, cfg: QAConfig, run_dir: Path | None = None, *, documents: Sequence[str] | None = None) -> None:
        if not cfg.resolved:
            raise ValueError("the QA recipe needs a resolved config (see resolve_config)")
        super().__init__(cfg, run_dir)
        assert cfg.model is not None and cfg.lm_data is not None and cfg.pe is not None and cfg.context_length
        self.context_length: int = cfg.context_length
        self.space: GridSpace = cfg.grid_space(1)
        self.tokenizer = load_tokenizer(cfg.lm_data, section="lm_data")
        self.source: QASource = build_source(cfg.data, self.tokenizer, documents=documents)
        self.builder = PromptBuilder(self.tokenizer)
        self._val: list[QAExample] | None = None
        self._step = 0  # optimizer steps done, seen through train_batch; names the best checkpoint
        self._best: ckpt.KeepBest | None = None

    # -- data -------------------------------------------------------------------------------
    def example(self, split: str, index: int, budget: int) -> QAExample:
        return make_example(self.source, self.builder, split, index, budget=budget, seed=self.cfg.train.seed)

    def eval_indices(self, split: str, count: int) -> list[int]:
        """The same ``count`` questions of a split at every length: a seeded sample without replacement."""
        n = self.source.num_items(split)
        order = np.random.default_rng([self.cfg.train.seed, 7919]).permutation(n)
        return [int(i) for i in order[: min(count, n)]]

    def eval_examples(self, split: str, count: int, budget: int) -> tuple[list[QAExample], int]:
        """Up to ``count`` examples at ``budget`` and how many did not fit (their gold document alone overflows)."""
        out, skipped = [], 0
        for i in self.eval_indices(split, count):
            try:
                out.append(self.example(split, i, budget))
            except PromptTooLong:
                skipped += 1
        return out, skipped

    # -- TrainTask --------------------------------------------------------------------------
    def fresh_model(self) -> nn.Module:
        """The LM run's architecture and PE, randomly initialised."""
        assert self.cfg.model is not None and self.cfg.pe is not None
        tok = self.tokenizer
        return build_lm(self.cfg.model, self.cfg.pe, self.space, vocab_size=tok.vocab_size, eos_id=tok.eos_id)

    def build_model(self) -> nn.Module:
        """The LM run's architecture and PE, with its checkpoint's weights (fp32, CPU)."""
        assert self.cfg.init_checkpoint is not None
        model = self.fresh_model()
        ckpt.load_weights(model, Path(self.cfg.init_checkpoint))
        return model

    def trained_checkpoint(self) -> Path:
        """``eval.checkpoint``: the best validation answer perplexity (``best/``, else the latest), or the latest."""
        assert self.run_dir is not None
        best = ckpt.latest_checkpoint(self.run_dir / BEST) if self.cfg.eval.checkpoint == "best" else None
        if (found := best or ckpt.latest_checkpoint(self.run_dir)) is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.run_dir} (or {self.run_dir / BEST})")
        return found

    def load_trained(self, checkpoint: Path | None = None) -> nn.Module:
        return load_weights_checked(self.fresh_model(), checkpoint or self.trained_checkpoint(), self.config_dict(),
                                    self.strict_sections)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Tensor]:
        t = self.cfg.train
        self._step = step + 1
        n_items = self.source.num_items("train")
        first = self.first_sample(step, micro, rank, world)
        examples = []
        for j, idx in enumerate(sample_blocks(n_items, first, t.batch_size, t.seed)):
            for k in range(_NEXT_TRIES):  # deterministic fallback keeps the batch a pure function of the step
                try:
                    examples.append(self.example("train", (int(idx) + k) % n_items, self.context_length))
                    break
                except PromptTooLong:
                    continue
            else:
                raise ValueError(f"{_NEXT_TRIES} training questions in a row from sample {first + j} do not fit "
                                 f"context_length = {self.cfg.context_length}; raise it")
        return collate_train(examples, self.tokenizer.eos_id)

    def shift_extent(self, model: nn.Module, batch: dict[str, Tensor]) -> list[int]:
        return [batch["input_ids"].shape[1]]

    def step(
        self, model: nn.Module, batch: dict[str, Tensor], *, shift: Tensor | None, draws: PEDraws | None
    ) -> StepOutput:
        ids = batch["input_ids"]  # (b, n), right-padded
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device).view(1, n, 1).expand(b, n, 1)
        if shift is not None:  # each row starts at its own z (App. A.5); the PE then skips L_OOD
            pos = self.space.apply_shift(pos, shift.to(ids.device, non_blocking=True)[:, None])
        total, count, out = answer_loss(model, ids, batch["labels"], pos, pe_draws=draws,
                                        pe_shifted=shift is not None)
        return StepOutput(total / max(count, 1), out.pe_aux_loss, out.pe_logs)

    def validation_examples(self) -> list[QAExample]:
        if self._val is None:
            self._val, _ = self.eval_examples("validation", self.cfg.eval.val_examples, self.context_length)
        return self._val

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Answer perplexity on validation questions at context_length; keeps the best weights in ``run_dir/best``."""
        device = self.device_of(model)
        length = self.context_length
        res = score_examples(model, self.validation_examples(), self.tokenizer, batch_size=self._batch(length),
                             max_new_tokens=None, device=device)
        metrics = {"answer_loss": res["loss"], "answer_ppl": res["ppl"]}
        self._keep_best(unwrap(model), res["ppl"])
        return metrics

    def _batch(self, length: int) -> int:
        return max(1, self.cfg.eval.batch_tokens // length)

    def _keep_best(self, model: nn.Module, ppl: float) -> None:
        if self.run_dir is None or self._step == 0:  # not called by the training loop: record nothing
            return
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        if self._best is None:
            self._best = ckpt.KeepBest(self.run_dir / BEST, "val_answer_ppl")
        config = {**self.config_dict(), "train": self.cfg.train.model_dump(mode="json")}
        self._best.offer(self._step, model, ppl, config)

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["lengths"].sum())

    @classmethod
    def build_task(cls, cfg: QAConfig, run_dir: Path) -> "QARecipe":
        """Resolves and checks the LM run before anything trains."""
        recipe = cls(resolve_config(cfg), run_dir)
        init = Path(recipe.cfg.init_checkpoint or "")
        vocab = ckpt.embedding_rows(init)
        if vocab != recipe.tokenizer.vocab_size:
            assert recipe.cfg.lm_data is not None
            raise ValueError(
                f"lm_data.tokenizer: the LM checkpoint {init} has {vocab} token embeddings but its tokenizer "
                f"({recipe.cfg.lm_data.tokenizer!r}) has {recipe.tokenizer.vocab_size}"
            )
        return recipe

    # -- evaluation -------------------------------------------------------------------------------
    def eval_plan(self) -> EvalPlan:
        """Table 2: the same questions at every length (default 1, 2, 4 and 8 times context_length)."""
        L, e = self.context_length, self.cfg.eval
        sizes = list(e.lengths or [L * f for f in (1, 2, 4, 8)])
        check_sizes(sizes, lambda n: n >= 16, "context lengths >= 16 tokens (Fig. 4's template)", "length")
        found = self.trained_checkpoint()
        vocab = ckpt.embedding_rows(found)
        if vocab != self.tokenizer.vocab_size:
            raise ValueError(f"lm_data.tokenizer: checkpoint {found} has {vocab} token embeddings, "
                             f"the tokenizer has {self.tokenizer.vocab_size}")
        header = {"checkpoint": str(found), "split": e.split, "context_length": L, "data": self.cfg.data.source}
        return EvalPlan(sizes, header, found, {"count": e.num_examples, "max_tokens": e.max_tokens})

    def eval_size(self, model: nn.Module, size: int, plan: EvalPlan, device: torch.device) -> dict[str, Any]:
        count, cap, split = plan.context["count"], plan.context["max_tokens"], plan.header["split"]
        n = count if cap is None else max(1, min(count, cap // size))
        examples, skipped = self.eval_examples(split, n, size)
        if not examples:
            raise ValueError(f"no {split} question fits in {size} tokens")
        res = score_examples(model, examples, self.tokenizer, batch_size=self._batch(size),
                             max_new_tokens=self.cfg.eval.max_new_tokens, device=device)
        samples = res.pop("samples")
        answers = self.source.answer_set
        rates = [e.copy_rate for e in examples]
        return {
            **res, "skipped": skipped,
            # What a score means: a uniform guess from the closed answer set, and copying a random document's answer.
            "chance": None if answers is None else 100.0 / len(answers),
            "copy_baseline": None if None in rates else 100.0 * float(np.mean(rates)),
            "mean_tokens": float(np.mean([e.num_tokens for e in examples])),
            "mean_docs": float(np.mean([len(e.documents) for e in examples])),
            "samples": samples[:5],
        }

    def write_figures(self, result: dict[str, Any], model: nn.Module) -> None:
        assert self.run_dir is not None
        name = self.run_dir.name
        plot_runs_qa({name: result}, self.run_dir / EVAL_PNG, title=f"{name}: QA vs context length ({result['split']})")

    def eval_table(self, result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
        L = result["context_length"]
        title = f"{result['run_dir']} — {result['split']} QA (fine-tuned at {L} tokens)"
        columns = ["length", "× train", "questions", "docs", "answer PPL", "EM", "strict EM", "chance", "copy", "seconds"]
        pct = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        cells = [
            [n, f"{int(n) / L:g}", str(r["examples"]), f"{r['mean_docs']:.1f}", f"{r['ppl']:.2f}", f"{r['em']:.1f}",
             f"{r['strict_em']:.1f}", pct(r.get("chance")), pct(r.get("copy_baseline")), f"{r['seconds']:.1f}"]
            for n, r in result["lengths"].items()
        ]
        return title, columns, cells

    @classmethod
    def plot_runs(cls, results: Any, path: Path, *, title: str) -> Path:
        return plot_runs_qa(results, path, title=title)


def plot_runs_qa(results: Any, path: Path, *, title: str) -> Path:
    """EM, strict EM and answer perplexity against context length, one colour per run."""
    from seqpe_nd.tasks.engine.plots import plot_qa

    trains = {r["context_length"] for r in results.values()}
    return plot_qa({name: r["lengths"] for name, r in results.items()}, path, title=title,
                   train_length=trains.pop() if len(trains) == 1 else None)

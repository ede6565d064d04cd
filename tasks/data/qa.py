"""Multi-document QA prompts (the paper's Fig. 4, RULER's SQuAD recipe) and the two data sources.

A prompt is the Fig. 4 template around ``k`` documents, one of which (the gold one) answers the
question; the others are distractors. :class:`PromptBuilder` fills a token budget: it adds
distractors in the source's (seeded, random) order until the next one would not fit, and puts the
gold document at a depth drawn once per example, so the same question asked at 1K, 2K, 4K and 8K
tokens sits at about the same relative depth among more and more distractors (the distractors of
a short prompt are a prefix of those of a longer one).

Token ids are the concatenation of separately tokenized pieces (template head, each
``Document i:`` header, each document body, separators, the question tail, the answer), so the
count is exact and a long prompt is assembled without re-tokenizing it; decoding the ids gives the
rendered text back (byte-level BPE is lossless). The budget counts every token the model sees:
prompt, answer and the end-of-text token.

Sources, both feeding the same builder:

- :class:`EmbeddedQA` (default, no download): paragraphs of the LM recipe's embedded text
  (:func:`seqpe_nd.tasks.data.text.embedded_documents`, split by document exactly as the LM corpus
  is), each with one planted fact about a made-up name ("The code of Marlow is 4821."). Names are
  distinct within a prompt, so exactly one document answers the question; answers are short.
- :class:`SquadQA`: SQuAD through ``datasets`` (hub, or SQuAD-format JSON files), paragraphs as
  documents, as RULER and the paper do. Our ``test`` split is SQuAD's validation split (RULER's
  evaluation set); our ``validation`` split holds out a fraction of the training paragraphs.

Shapes: ``b`` examples, ``n`` tokens.
"""

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.text import SPLITS, TextTokenizer, embedded_documents, split_documents

IGNORE_INDEX = -100
"""Label of every token that is not part of the answer or its end-of-text token."""

# --- the paper's Fig. 4 template (RULER's ``qa`` template, word for word) ----------------------------

INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
PROMPT_HEAD = f"{INSTRUCTION}\n\nThe following are given documents.\n\n"
DOCUMENT = "Document {index}:\n{text}"
DOCUMENT_SEPARATOR = "\n\n"
PROMPT_TAIL = f"\n\n{INSTRUCTION}\n\nQuestion: {{question}} Answer:"
ANSWER = " {answer}"


def render_document(index: int, text: str) -> str:
    """One document of MULTI_DOCS, numbered from 1 (RULER's ``Document {i}:`` format)."""
    return DOCUMENT.format(index=index, text=text)


def render_prompt(documents: Sequence[str], question: str) -> str:
    """Fig. 4 up to ``Answer:``: the instruction, the numbered documents, the instruction again, the question."""
    docs = DOCUMENT_SEPARATOR.join(render_document(i + 1, d) for i, d in enumerate(documents))
    return PROMPT_HEAD + docs + PROMPT_TAIL.format(question=question)


# --- examples ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QAItem:
    """A question with its gold document and a stream of distractor documents (seeded, lazily drawn)."""

    id: str
    question: str
    answers: tuple[str, ...]
    """Gold answers; the first is the training target (SQuAD lists several)."""
    gold: str
    distractors: Iterator[str]


@dataclass(frozen=True)
class QAExample:
    """One tokenized prompt at one budget, with where its gold document landed."""

    id: str
    question: str
    answers: tuple[str, ...]
    prompt_ids: list[int]
    """Tokens up to and including ``Answer:``."""
    answer_ids: list[int]
    """Tokens of ``" " + answers[0]`` followed by the end-of-text token: the only ones with a loss."""
    documents: tuple[str, ...]
    gold_index: int
    """0-based index of the gold document in ``documents``."""
    depth: float
    """Where the gold document starts within the documents' tokens: 0 = first, 1 = last."""
    budget: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class PromptTooLong(ValueError):
    """The template, question, answer and gold document alone exceed the budget."""


class PromptBuilder:
    """Fills a token budget with the gold document plus distractors (RULER), in Fig. 4's template."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.head = tokenizer.encode(PROMPT_HEAD)
        self.separator = tokenizer.encode(DOCUMENT_SEPARATOR)
        self._headers: dict[int, list[int]] = {}

    def header(self, index: int) -> list[int]:
        """Tokens of ``Document {index}:\\n``."""
        if index not in self._headers:
            self._headers[index] = self.tokenizer.encode(DOCUMENT.format(index=index, text=""))
        return self._headers[index]

    def build(self, item: QAItem, *, budget: int, depth: float) -> QAExample:
        """The prompt of ``item`` with as many distractors as fit in ``budget`` tokens.

        Args:
            budget: tokens of prompt + answer + end-of-text; the result uses at most this many and
                stops at the first distractor that would overflow it (so it ends within one document).
            depth: in [0, 1]; the gold document goes to index ``round(depth * (k - 1))`` of ``k``.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth = {depth} must lie in [0, 1]")
        tok = self.tokenizer
        tail = tok.encode(PROMPT_TAIL.format(question=item.question))
        answer = tok.encode(ANSWER.format(answer=item.answers[0])) + [tok.eos_id]
        bodies = [tok.encode(item.gold)]
        texts = [item.gold]
        used = len(self.head) + len(tail) + len(answer) + len(self.header(1)) + len(bodies[0])
        if used > budget:
            raise PromptTooLong(
                f"example {item.id}: template, question, answer and gold document need {used} tokens, "
                f"more than the budget of {budget}"
            )
        for text in item.distractors:
            body = tok.encode(text)
            # The header numbers are 1..k whatever the order, so their total only depends on k.
            extra = len(self.separator) + len(self.header(len(bodies) + 1)) + len(body)
            if used + extra > budget:
                break
            used += extra
            bodies.append(body)
            texts.append(text)
        k = len(bodies)
        gold_index = round(depth * (k - 1))
        order = list(range(1, k))
        order.insert(gold_index, 0)  # distractors keep the source's order around the gold document
        ids = list(self.head)
        gold_start, docs_start = 0, len(ids)
        for slot, j in enumerate(order):
            if slot:
                ids += self.separator
            if j == 0:
                gold_start = len(ids)
            ids += self.header(slot + 1) + bodies[j]
        docs_len = len(ids) - docs_start
        span = docs_len - (len(self.header(gold_index + 1)) + len(bodies[0]))
        ids += tail
        assert len(ids) + len(answer) == used, "token accounting drifted"
        return QAExample(
            id=item.id, question=item.question, answers=item.answers, prompt_ids=ids, answer_ids=answer,
            documents=tuple(texts[j] for j in order), gold_index=gold_index,
            depth=(gold_start - docs_start) / span if span > 0 else 0.0, budget=budget,
        )


# --- batches ----------------------------------------------------------------------------------------

def collate_train(examples: Sequence[QAExample], pad_id: int) -> dict[str, Int[Tensor, "b n"]]:
    """Right-padded ``input_ids`` (prompt + answer + EOS) and ``labels`` that keep only answer + EOS.

    Right padding needs no attention mask under causal attention and keeps every row at positions
    0…n-1, the positions generation uses too (the released code left-padded without position ids).
    ``lengths`` are the real tokens per row.
    """
    n = max(e.num_tokens for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(len(examples), dtype=torch.long)
    for r, e in enumerate(examples):
        p, a = len(e.prompt_ids), len(e.answer_ids)
        ids[r, : p + a] = torch.tensor(e.prompt_ids + e.answer_ids)
        labels[r, p : p + a] = torch.tensor(e.answer_ids)
        lengths[r] = p + a
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def collate_prompts(examples: Sequence[QAExample], pad_id: int) -> dict[str, Int[Tensor, "b n"]]:
    """Left-padded prompts for generation, their ``attention_mask`` and explicit ``position_ids``.

    Positions count real tokens from 0 in every row, as in training; padding gets position 0 and is
    masked out.
    """
    n = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
        p = len(e.prompt_ids)
        ids[r, n - p :] = torch.tensor(e.prompt_ids)
        mask[r, n - p :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


# --- sources ----------------------------------------------------------------------------------------

@runtime_checkable
class QASource(Protocol):
    """Questions per split; an item is a pure function of ``(split, index, rng)``."""

    def num_items(self, split: str) -> int: ...

    def item(self, split: str, index: int, rng: np.random.Generator) -> QAItem: ...


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one example: its depth, its distractors and (embedded) its facts."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_example(
    source: QASource, builder: PromptBuilder, split: str, index: int, *, budget: int, seed: int
) -> QAExample:
    """Example ``index`` of ``split`` at ``budget`` tokens; the same question and depth at every budget."""
    rng = example_rng(seed, split, index)
    depth = float(rng.random())  # drawn first: independent of how many distractors the budget takes
    return builder.build(source.item(split, index, rng), budget=budget, depth=depth)



class QADataConfig(Frozen):
    """Where questions and documents come from (the ``data:`` section of a QA run)."""

    source: Literal["embedded", "hf", "files"] = "embedded"
    """``embedded``: planted facts in the LM recipe's embedded text; ``hf``: SQuAD from the hub; ``files``: SQuAD-format JSON."""
    dataset: str = "rajpurkar/squad"
    """``hf`` only: data set name for ``datasets.load_dataset``."""
    dataset_config: str | None = None
    """``hf`` only: data set configuration name."""
    data_files: dict[str, list[str]] | None = None
    """``files`` only: ``{train: [...], validation: [...]}`` JSON / JSON-lines files with SQuAD's columns."""
    test_split: str = "validation"
    """``hf``/``files``: the source split used as our test split (RULER evaluates on SQuAD's validation)."""
    question_field: str = "question"
    context_field: str = "context"
    answers_field: str = "answers"
    """A SQuAD ``{"text": [...]}`` mapping, a list of strings or one string."""
    valid_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Fraction of documents held out for validation (embedded: as the LM corpus; SQuAD: training paragraphs)."""
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    """``embedded`` only: fraction of documents held out for test (the LM corpus's test documents)."""
    split_seed: int = 0
    """Seed of the document-level split (0 = the LM corpus's default split)."""
    min_chars: PositiveInt = 100
    """``embedded`` only: shortest passage used as a document."""
    max_chars: PositiveInt = 240
    """``embedded`` only: longest passage used as a document (longer paragraphs are cut at sentence ends)."""
    train_items: PositiveInt = 100_000
    """``embedded`` only: questions per training epoch (each a fresh draw of facts and distractors)."""
    eval_items: PositiveInt = 2_000
    """``embedded`` only: questions in the validation and in the test split."""

    @model_validator(mode="after")
    def _check(self) -> "QADataConfig":
        if self.source == "files" and not self.data_files:
            raise ValueError("data.source 'files' needs data.data_files ({train: [...], validation: [...]})")
        if self.data_files is not None and "train" not in self.data_files:
            raise ValueError(f"data.data_files needs a 'train' entry, got splits {sorted(self.data_files)}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"data.min_chars = {self.min_chars} exceeds data.max_chars = {self.max_chars}")
        return self


def build_source(cfg: QADataConfig, *, documents: Sequence[str] | None = None) -> QASource:
    """The source a ``data:`` section names; ``documents`` replaces the embedded text (tests)."""
    if cfg.source == "embedded":
        return EmbeddedQA(cfg, documents=documents)
    return SquadQA(cfg)


# --- embedded: planted facts ------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“*(])")
_PROSE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:'()-\"“”’")
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x")
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Perth", "Kyoto", "Porto",
    "Accra", "Bergen", "Cusco", "Dakar", "Graz", "Harbin", "Izmir", "Jaipur", "Krakow", "Lagos", "Malmo", "Nantes",
)
# (fact sentence, question, answer kind): one fact per document, about a name unique in the prompt.
RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("The code of {name} is {value}.", "What is the code of {name}?", "code"),
    ("{name} was founded in {value}.", "In which year was {name} founded?", "year"),
    ("{name} lives in {value}.", "Which city does {name} live in?", "city"),
)


def prose_paragraphs(documents: Sequence[str], *, min_chars: int, max_chars: int) -> list[str]:
    """Prose passages of the documents, deduplicated in order.

    Paragraphs with code or lists are dropped (whitespace collapsed); a long paragraph is cut at
    sentence ends into passages of at most ``max_chars``; passages under ``min_chars`` are dropped.
    """
    out: dict[str, None] = {}
    for doc in documents:
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            if len(text) < min_chars or ">>>" in text or not text[0].isupper() or text[-1] != ".":
                continue
            if sum(c in _PROSE for c in text) < 0.93 * len(text):
                continue
            passage = ""
            for sentence in _SENTENCE_END.split(text):
                joined = f"{passage} {sentence}" if passage else sentence
                if len(joined) <= max_chars:
                    passage = joined
                    continue
                if min_chars <= len(passage):
                    out.setdefault(passage)
                passage = sentence if len(sentence) <= max_chars else ""
            if min_chars <= len(passage) <= max_chars:
                out.setdefault(passage)
    return list(out)


@functools.lru_cache(maxsize=2)
def _embedded_paragraphs(valid_fraction: float, test_fraction: float, split_seed: int, min_chars: int, max_chars: int) -> dict[str, list[str]]:
    return _split_paragraphs(embedded_documents(), valid_fraction, test_fraction, split_seed, min_chars, max_chars)


def _split_paragraphs(
    docs: Sequence[str], valid_fraction: float, test_fraction: float, split_seed: int, min_chars: int, max_chars: int
) -> dict[str, list[str]]:
    # The same document-level split as the LM corpus (text_data.split_documents): QA test paragraphs
    # come from documents the LM never trained on.
    idx = split_documents(len(docs), valid_fraction, test_fraction, split_seed)
    return {s: prose_paragraphs([docs[i] for i in idx[s]], min_chars=min_chars, max_chars=max_chars) for s in SPLITS}


def make_name(rng: np.random.Generator) -> str:
    """A pronounceable made-up name such as ``Marlow`` or ``Tesvin``."""
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(int(rng.integers(2, 4)))]
    return ("".join(parts) + _CODAS[rng.integers(len(_CODAS))]).capitalize()


def make_value(kind: str, rng: np.random.Generator) -> str:
    if kind == "code":
        return str(int(rng.integers(1000, 10000)))
    if kind == "year":
        return str(int(rng.integers(1500, 2025)))
    if kind == "city":
        return CITIES[rng.integers(len(CITIES))]
    raise ValueError(f"unknown answer kind {kind!r}; allowed: code, year, city")


def plant(paragraph: str, fact: str, rng: np.random.Generator) -> str:
    """``paragraph`` with ``fact`` inserted at a random sentence boundary (start and end included)."""
    sentences = _SENTENCE_END.split(paragraph)
    at = int(rng.integers(len(sentences) + 1))
    return " ".join(sentences[:at] + [fact] + sentences[at:])


class EmbeddedQA:
    """Seeded multi-document QA over the embedded text: one planted fact per document, names unique per prompt."""

    def __init__(self, cfg: QADataConfig, *, documents: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        args = (cfg.valid_fraction, cfg.test_fraction, cfg.split_seed, cfg.min_chars, cfg.max_chars)
        self.paragraphs = _embedded_paragraphs(*args) if documents is None else _split_paragraphs(documents, *args)
        for split in SPLITS:
            if len(self.paragraphs[split]) < 2:
                raise ValueError(
                    f"the {split} split has {len(self.paragraphs[split])} paragraphs of {cfg.min_chars}-{cfg.max_chars} "
                    "characters; a prompt needs a gold document and distractors (widen data.min_chars/max_chars)"
                )

    def num_items(self, split: str) -> int:
        return self.cfg.train_items if split == "train" else self.cfg.eval_items

    def item(self, split: str, index: int, rng: np.random.Generator) -> QAItem:
        paragraphs = self.paragraphs[split]
        fact, question, kind = RELATIONS[rng.integers(len(RELATIONS))]
        name, value = make_name(rng), make_value(kind, rng)
        gold_at = int(rng.integers(len(paragraphs)))
        gold = plant(paragraphs[gold_at], fact.format(name=name, value=value), rng)
        return QAItem(
            id=f"{split}-{index}", question=question.format(name=name), answers=(value,), gold=gold,
            distractors=self._distractors(paragraphs, gold_at, name, rng),
        )

    @staticmethod
    def _distractors(paragraphs: Sequence[str], gold_at: int, gold_name: str, rng: np.random.Generator) -> Iterator[str]:
        names = {gold_name}
        order = rng.permutation(len(paragraphs))
        for j in order:
            if j == gold_at:
                continue
            fact, _, kind = RELATIONS[rng.integers(len(RELATIONS))]
            name = make_name(rng)
            while name in names:  # the question must be answerable from exactly one document
                name = make_name(rng)
            names.add(name)
            yield plant(paragraphs[j], fact.format(name=name, value=make_value(kind, rng)), rng)


# --- SQuAD ------------------------------------------------------------------------------------------

def _answers(value: Any, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        out: tuple[str, ...] = (value,)
    elif isinstance(value, dict) and "text" in value:
        out = tuple(value["text"])
    elif isinstance(value, (list, tuple)):
        out = tuple(value)
    else:
        raise ValueError(f"data.answers_field {field_name!r} holds {type(value).__name__}; expected SQuAD's {{'text': [...]}}, a list or a string")
    out = tuple(a for a in out if isinstance(a, str) and a.strip())
    return out


@dataclass
class _SquadSplit:
    contexts: list[str] = field(default_factory=list)
    rows: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)  # (question, answers, context index)


class SquadQA:
    """SQuAD through ``datasets``: every question with its paragraph, other paragraphs as distractors."""

    def __init__(self, cfg: QADataConfig) -> None:
        import datasets  # heavy import, only on this path

        self.cfg = cfg
        if cfg.source == "hf":
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
        else:
            files = {k: [str(Path(p)) for p in v] for k, v in (cfg.data_files or {}).items()}
            ds = datasets.load_dataset("json", data_files=files)
        for split_name in ("train", cfg.test_split):
            if split_name not in ds:
                raise ValueError(f"the data set has no split {split_name!r} (data.test_split); splits: {sorted(ds)}")
        columns = ds["train"].column_names
        for name in (cfg.question_field, cfg.context_field, cfg.answers_field):
            if name not in columns:
                raise ValueError(f"data field {name!r} is not a column; columns: {columns}")
        train = self._read(ds["train"])
        held = set(split_documents(len(train.contexts), cfg.valid_fraction, 0.0, cfg.split_seed)["validation"].tolist())
        self.splits = {"train": _SquadSplit(), "validation": _SquadSplit(), "test": self._read(ds[cfg.test_split])}
        remap: dict[int, tuple[str, int]] = {}
        for c, text in enumerate(train.contexts):
            target = self.splits["validation" if c in held else "train"]
            remap[c] = ("validation" if c in held else "train", len(target.contexts))
            target.contexts.append(text)
        for question, answers, c in train.rows:
            split, new = remap[c]
            self.splits[split].rows.append((question, answers, new))
        for split, part in self.splits.items():
            if not part.rows or len(part.contexts) < 2:
                raise ValueError(f"SQuAD {split} split has {len(part.rows)} questions over {len(part.contexts)} paragraphs; need at least 2 paragraphs")

    def _read(self, table: Any) -> _SquadSplit:
        out = _SquadSplit()
        index: dict[str, int] = {}
        cfg = self.cfg
        for q, ctx, ans in zip(table[cfg.question_field], table[cfg.context_field], table[cfg.answers_field], strict=True):
            answers = _answers(ans, cfg.answers_field)
            if not answers:
                continue  # unanswerable (SQuAD 2.0 style) rows have no target
            ctx = ctx.strip()
            if ctx not in index:
                index[ctx] = len(out.contexts)
                out.contexts.append(ctx)
            out.rows.append((" ".join(q.split()), answers, index[ctx]))
        return out

    def num_items(self, split: str) -> int:
        return len(self.splits[split].rows)

    def item(self, split: str, index: int, rng: np.random.Generator) -> QAItem:
        part = self.splits[split]
        question, answers, c = part.rows[index]

        def distractors() -> Iterator[str]:
            for j in rng.permutation(len(part.contexts)):
                if j != c:
                    yield part.contexts[j]

        return QAItem(id=f"{split}-{index}", question=question, answers=answers, gold=part.contexts[c], distractors=distractors())

"""Where QA items come from: planted facts in the embedded text (no download), or SQuAD (hub or local files).

Both are :class:`~seqpe_nd.tasks.data.qa.QASource` s feeding the same prompt builder; see
:mod:`seqpe_nd.tasks.data.qa` for the template, the examples and the batches.
"""

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seqpe_nd.tasks.data.hub import hub_dataset
from seqpe_nd.tasks.data.qa import Passage, QADataConfig, QAItem, QASource
from seqpe_nd.tasks.data.text import SPLITS, TextTokenizer, embedded_documents, split_documents


def build_source(cfg: QADataConfig, tokenizer: TextTokenizer, *, documents: Sequence[str] | None = None) -> QASource:
    """The source a ``data:`` section names; ``documents`` replaces the embedded text (tests)."""
    if cfg.source == "embedded":
        return EmbeddedQA(cfg, tokenizer, documents=documents)
    return SquadQA(cfg)


# --- embedded: planted facts ------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“*(])")
_PROSE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:'()-\"“”’")
KEY_WORDS: tuple[str, ...] = (
    "aircraft", "airplane", "apple", "bag", "ball", "band", "basket", "bat", "bear", "bed", "bee", "bell", "bird",
    "boat", "book", "bottle", "box", "bread", "bridge", "bus", "butter", "button", "cab", "candle", "canvas", "car",
    "carriage", "cat", "cattle", "chain", "cheese", "chicken", "church", "clock", "coat", "coffee", "corn", "cotton",
    "crab", "cup", "dish", "dog", "door", "drum", "duck", "eagle", "egg", "fern", "fish", "flag", "flower", "frog",
    "fruit", "garden", "glass", "goat", "gun", "hammer", "hat", "horse", "house", "iron", "jacket", "kettle",
    "ladder", "lamp", "leaf", "lion", "lizard", "mailbox", "meat", "milk", "mirror", "mouse", "mushroom", "nut",
    "orchid", "owl", "paper", "pencil", "piano", "pig", "pine", "pipe", "plane", "plate", "potato", "rabbit",
    "radio", "ring", "river", "rock", "roof", "rope", "sail", "sauce", "school", "shark", "sheep", "shell", "ship",
    "shoe", "shrub", "snake", "socket", "spider", "stone", "sugar", "tent", "tiger", "tomato", "tower", "tree",
    "truck", "tube", "turtle", "vine", "violin", "wagon", "wall", "whale", "wheel", "window", "wine", "wire", "wolf",
    "wool", "worm",
)
"""Candidate keys (what a question asks about); those one token long under the run's tokenizer are used."""
VALUE_WORDS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple", "grey", "violet",
    "gold", "scarlet", "silver", "cyan",
)
"""Candidate answers; those one token long under the run's tokenizer form the closed answer set."""
FACT = "The colour of the {key} is {value}."
QUESTION = "What is the colour of the {key}?"
SENTENCE = FACT
"""The answer of ``data.answer_form: sentence``: the gold fact restated."""
OTHER_FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("The size of the {key} is {value}.", ("large", "small", "tall", "short", "long", "wide", "narrow", "thick", "thin")),
    ("The texture of the {key} is {value}.", ("soft", "hard", "smooth", "rough", "sharp", "flat", "dry", "warm", "fresh")),
)
"""Distractor facts of ``data.distractor_facts: other``: another property of another key (never a colour)."""
MIN_KEYS, MIN_VALUES = 16, 4


def single_token_words(tokenizer: TextTokenizer, words: Sequence[str]) -> tuple[str, ...]:
    """The words that are exactly one token after a space (as they appear in facts, questions and answers)."""
    return tuple(w for w in words if len(tokenizer.encode(" " + w)) == 1)


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


def plant(paragraph: str, fact: str, rng: np.random.Generator) -> str:
    """``paragraph`` with ``fact`` inserted at a random sentence boundary (start and end included)."""
    sentences = _SENTENCE_END.split(paragraph)
    at = int(rng.integers(len(sentences) + 1))
    return " ".join(sentences[:at] + [fact] + sentences[at:])


class EmbeddedQA:
    """Seeded multi-document QA over the embedded text: one planted fact per document, keys unique per prompt.

    The gold document's fact is ``FACT``: the colour (from ``answer_set``) of the key the question asks
    about. A distractor's fact is about another key: its colour (``distractor_facts: same``: only the key
    tells the gold document apart) or its size or texture (``other``: only the gold document names a
    colour). The answer trained on is the gold fact restated (``answer_form: sentence``) or its colour. Keys and values are single tokens of the run's tokenizer; a prompt uses each key
    at most once, so its distractor stream ends when the keys do.
    """

    def __init__(self, cfg: QADataConfig, tokenizer: TextTokenizer, *, documents: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        args = (cfg.valid_fraction, cfg.test_fraction, cfg.split_seed, cfg.min_chars, cfg.max_chars)
        self.paragraphs = _embedded_paragraphs(*args) if documents is None else _split_paragraphs(documents, *args)
        for split in SPLITS:
            if len(self.paragraphs[split]) < 2:
                raise ValueError(
                    f"the {split} split has {len(self.paragraphs[split])} paragraphs of {cfg.min_chars}-{cfg.max_chars} "
                    "characters; a prompt needs a gold document and distractors (widen data.min_chars/max_chars)"
                )
        self.keys = single_token_words(tokenizer, KEY_WORDS)
        self.answer_set: tuple[str, ...] | None = single_token_words(tokenizer, VALUE_WORDS)
        self.other = tuple((fact, single_token_words(tokenizer, values)) for fact, values in OTHER_FACTS)
        needs = [("keys", self.keys, MIN_KEYS), ("answers", self.answer_set, MIN_VALUES)]
        if cfg.distractor_facts == "other":
            needs += [(f"{fact.split()[1]} values", values, 2) for fact, values in self.other]
        for what, found, need in needs:
            if len(found) < need:
                raise ValueError(
                    f"lm_data.tokenizer: only {len(found)} of the embedded QA {what} are one token long under this "
                    f"tokenizer ({', '.join(found) or 'none'}); need at least {need} (use data.source 'hf' or 'files')"
                )

    def num_items(self, split: str) -> int:
        return self.cfg.train_items if split == "train" else self.cfg.eval_items

    def item(self, split: str, index: int, rng: np.random.Generator) -> QAItem:
        paragraphs, values = self.paragraphs[split], self.answer_set
        assert values is not None
        keys = [self.keys[int(i)] for i in rng.permutation(len(self.keys))]  # distinct per prompt, gold first
        value = values[int(rng.integers(len(values)))]
        gold_at = int(rng.integers(len(paragraphs)))
        gold = plant(paragraphs[gold_at], FACT.format(key=keys[0], value=value), rng)
        sentence = SENTENCE.format(key=keys[0], value=value) if self.cfg.answer_form == "sentence" else None
        return QAItem(
            id=f"{split}-{index}", question=QUESTION.format(key=keys[0]), answers=(value,), gold=gold,
            distractors=self._distractors(paragraphs, gold_at, keys[1:], rng), target=sentence,
        )

    def _distractors(
        self, paragraphs: Sequence[str], gold_at: int, keys: Sequence[str], rng: np.random.Generator
    ) -> Iterator[Passage]:
        assert self.answer_set is not None
        kinds = [(FACT, self.answer_set)] if self.cfg.distractor_facts == "same" else list(self.other)
        order = (int(j) for j in rng.permutation(len(paragraphs)) if j != gold_at)
        for key, j in zip(keys, order):  # the question must be answerable from exactly one document
            fact, values = kinds[int(rng.integers(len(kinds)))]
            value = values[int(rng.integers(len(values)))]
            yield Passage(plant(paragraphs[j], fact.format(key=key, value=value), rng), value)


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

    answer_set: tuple[str, ...] | None = None  # open answers: no chance level

    def __init__(self, cfg: QADataConfig) -> None:
        import datasets  # heavy import, only on this path

        self.cfg = cfg
        if cfg.source == "hf":
            local = ("read local files instead (data.source: files with data.data_files: {train: [train.jsonl], "
                     "validation: [dev.jsonl]}, JSON or JSON-lines rows with question, context and answers columns, "
                     "as Dataset.to_json writes them)")
            with hub_dataset("data.dataset", cfg.dataset, config=cfg.dataset_config, local=local):
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

        def distractors() -> Iterator[Passage]:
            for j in rng.permutation(len(part.contexts)):
                if j != c:
                    yield Passage(part.contexts[j])

        return QAItem(id=f"{split}-{index}", question=question, answers=answers, gold=part.contexts[c], distractors=distractors())

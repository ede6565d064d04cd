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

from seqpe_nd.tasks.data.qa import QADataConfig, QAItem, QASource
from seqpe_nd.tasks.data.text import SPLITS, embedded_documents, split_documents


def build_source(cfg: QADataConfig, *, documents: Sequence[str] | None = None) -> QASource:
    """The source a ``data:`` section names; ``documents`` replaces the embedded text (tests)."""
    if cfg.source == "embedded":
        return EmbeddedQA(cfg, documents=documents)
    return SquadQA(cfg)


# --- embedded: planted facts ------------------------------------------------------------------------


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

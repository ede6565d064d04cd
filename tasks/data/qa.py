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
  is), each with one planted fact: the gold one "The colour of the horse is red.", a distractor
  "The size of the boat is tall." (``data.distractor_facts``). Keys and answers come from closed
  sets of words that are one token each under the run's tokenizer, so exact match measures
  retrieval, not spelling; keys are distinct within a prompt, so exactly one document answers the
  question, and every document records the value its fact gives (the "copy some document" baseline).
- :class:`SquadQA`: SQuAD through ``datasets`` (hub, or SQuAD-format JSON files), paragraphs as
  documents, as RULER and the paper do. Our ``test`` split is SQuAD's validation split (RULER's
  evaluation set); our ``validation`` split holds out a fraction of the training paragraphs.

Shapes: ``b`` examples, ``n`` tokens.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.text import SPLITS, TextTokenizer

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

class Passage(NamedTuple):
    """One document of a prompt, with the answer its planted fact gives (None: no planted fact, e.g. SQuAD)."""

    text: str
    answer: str | None = None


@dataclass(frozen=True)
class QAItem:
    """A question with its gold document and a stream of distractor documents (seeded, lazily drawn)."""

    id: str
    question: str
    answers: tuple[str, ...]
    """Gold answers; the first is the training target (SQuAD lists several)."""
    gold: str
    distractors: Iterator[Passage]
    target: str | None = None
    """The text trained on and asked of a strict match (after ``Answer:``); None: ``answers[0]``."""

    @property
    def target_text(self) -> str:
        return self.answers[0] if self.target is None else self.target


@dataclass(frozen=True)
class QAExample:
    """One tokenized prompt at one budget, with where its gold document landed."""

    id: str
    question: str
    answers: tuple[str, ...]
    prompt_ids: list[int]
    """Tokens up to and including ``Answer:``."""
    answer_ids: list[int]
    """Tokens of ``" " + target`` followed by the end-of-text token: the only ones with a loss."""
    target: str
    """What is trained on and what strict EM compares with (``answers[0]``, or the source's answer sentence)."""
    documents: tuple[str, ...]
    document_answers: tuple[str | None, ...]
    """The answer each document's planted fact gives (the gold one's is ``answers[0]``), aligned with ``documents``."""
    gold_index: int
    """0-based index of the gold document in ``documents``."""
    depth: float
    """Where the gold document starts within the documents' tokens: 0 = first, 1 = last."""
    budget: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)

    @property
    def copy_rate(self) -> float | None:
        """Chance that copying a uniformly drawn document's answer is right (None: documents carry no answer)."""
        if any(a is None for a in self.document_answers):
            return None
        return sum(a in self.answers for a in self.document_answers) / len(self.document_answers)


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
        answer = tok.encode(ANSWER.format(answer=item.target_text)) + [tok.eos_id]
        bodies = [tok.encode(item.gold)]
        texts: list[str] = [item.gold]
        given: list[str | None] = [item.answers[0]]
        used = len(self.head) + len(tail) + len(answer) + len(self.header(1)) + len(bodies[0])
        if used > budget:
            raise PromptTooLong(
                f"example {item.id}: template, question, answer and gold document need {used} tokens, "
                f"more than the budget of {budget}"
            )
        for text, gives in item.distractors:
            body = tok.encode(text)
            # The header numbers are 1..k whatever the order, so their total only depends on k.
            extra = len(self.separator) + len(self.header(len(bodies) + 1)) + len(body)
            if used + extra > budget:
                break
            used += extra
            bodies.append(body)
            texts.append(text)
            given.append(gives)
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
            target=item.target_text,
            documents=tuple(texts[j] for j in order), document_answers=tuple(given[j] for j in order),
            gold_index=gold_index,
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

    answer_set: tuple[str, ...] | None
    """The closed set every answer is drawn from (chance = 1 / its size); None: open answers (SQuAD)."""

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
    distractor_facts: Literal["same", "other"] = "same"
    """``embedded`` only: what a distractor's planted fact says about its (other) key. ``same``: its colour, so
    only the key tells the gold document apart; ``other``: its size or texture, so the one colour in the prompt
    is the gold document's (the smoke benchmark's setting: every method answers 100 % at the fine-tuning length,
    83-100 % at 8x; with ``same`` the 2-layer smoke model stays near the copy-a-document level)."""
    answer_form: Literal["sentence", "value"] = "sentence"
    """``embedded`` only: what the model is trained to answer. ``sentence``: the fact restated
    (``The colour of the horse is red.``), whose last word is the retrieved value: copying it after ``of the horse is`` is
    the in-context induction a small LM already does; ``value``: the colour alone, which needs the key
    matched in one step (at smoke scale RoPE stays at the copy-a-random-document level after 4000 steps).
    EM checks the colour either way."""

    @model_validator(mode="after")
    def _check(self) -> "QADataConfig":
        if self.source == "files" and not self.data_files:
            raise ValueError("data.source 'files' needs data.data_files ({train: [...], validation: [...]})")
        if self.data_files is not None and "train" not in self.data_files:
            raise ValueError(f"data.data_files needs a 'train' entry, got splits {sorted(self.data_files)}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"data.min_chars = {self.min_chars} exceeds data.max_chars = {self.max_chars}")
        return self


# --- scoring answers (the paper's EM and a strict variant) -------------------------------------------

def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    """The paper's EM: some lower-cased gold answer is contained in the lower-cased generation."""
    pred = prediction.lower()
    return any(a.lower() in pred for a in answers if a)


def strict_match(prediction: str, answers: Sequence[str]) -> bool:
    """Strict EM: the whitespace-stripped generation equals some gold answer exactly (case included)."""
    pred = prediction.strip()
    return any(pred == a.strip() for a in answers)



def decode_answer(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
    """The generated text before the first end-of-text token."""
    ids = list(ids)
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)

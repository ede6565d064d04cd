"""QA prompts and data: Fig. 4 rendering, budget filling, label masking, both sources on local data."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydoc_data.topics import topics

from seqpe_nd.tasks.data.qa import (
    IGNORE_INDEX,
    PromptBuilder,
    PromptTooLong,
    QADataConfig,
    Passage,
    QAItem,
    collate_prompts,
    collate_train,
    make_example,
    render_prompt,
)
from seqpe_nd.tasks.data.qa_sources import KEY_WORDS, MIN_KEYS, OTHER_FACTS, VALUE_WORDS, build_source, plant
from seqpe_nd.tasks.data.text import TextTokenizer, train_bpe

GLOSSARY = " ".join(KEY_WORDS + VALUE_WORDS + tuple(w for _, values in OTHER_FACTS for w in values))
"""Repeated in the test corpus so that a 2048-token BPE makes every key and colour one token (as the
embedded corpus's 4096-token BPE does for most); not prose, so never a QA document."""
DOCS = [topics[k] for k in sorted(topics)]  # part of the embedded text, available instantly
CORPUS = DOCS + [GLOSSARY] * 200
"""What the test tokenizers are trained on."""


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return train_bpe(CORPUS, 2048)


@pytest.fixture(scope="module")
def source(tokenizer: TextTokenizer):
    return build_source(QADataConfig(), tokenizer, documents=DOCS)


def test_render_prompt_matches_fig4_by_hand() -> None:
    expected = (
        "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n"
        "\n"
        "The following are given documents.\n"
        "\n"
        "Document 1:\n"
        "Oslo is cold.\n"
        "\n"
        "Document 2:\n"
        "The code of Marlow is 4821.\n"
        "\n"
        "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n"
        "\n"
        "Question: What is the code of Marlow? Answer:"
    )
    assert render_prompt(["Oslo is cold.", "The code of Marlow is 4821."], "What is the code of Marlow?") == expected


def _item(gold: str, distractors: list[str], question: str = "What is the code of Marlow?", answer: str = "4821") -> QAItem:
    return QAItem(id="x", question=question, answers=(answer,), gold=gold, distractors=iter(map(Passage, distractors)))


def test_token_ids_decode_to_the_rendered_prompt(tokenizer: TextTokenizer) -> None:
    distractors = [f"Passage number {i} talks about nothing in particular." for i in range(20)]
    ex = PromptBuilder(tokenizer).build(_item("The code of Marlow is 4821.", distractors), budget=300, depth=0.5)
    assert tokenizer.decode(ex.prompt_ids) == render_prompt(ex.documents, ex.question)
    assert tokenizer.decode(ex.answer_ids) == " 4821<|endoftext|>"
    assert ex.answer_ids[-1] == tokenizer.eos_id
    assert ex.documents[ex.gold_index] == "The code of Marlow is 4821."
    assert list(ex.documents[: ex.gold_index] + ex.documents[ex.gold_index + 1 :]) == distractors[: len(ex.documents) - 1]


@pytest.mark.parametrize("budget", [200, 256, 333, 512, 1024])
def test_builder_fills_budget_to_within_one_document(tokenizer: TextTokenizer, budget: int) -> None:
    rng = np.random.default_rng(budget)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    distractors = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))).capitalize() + "." for _ in range(200)]
    builder = PromptBuilder(tokenizer)
    ex = builder.build(_item("The code of Marlow is 4821.", distractors), budget=budget, depth=float(rng.random()))
    used = len(ex.documents) - 1
    nxt = distractors[used]  # the first distractor left out
    needed = len(builder.separator) + len(builder.header(len(ex.documents) + 1)) + len(tokenizer.encode(nxt))
    assert ex.num_tokens <= budget < ex.num_tokens + needed


def test_embedded_prompts_hit_budget_and_keep_question_and_depth_across_lengths(tokenizer, source) -> None:
    builder = PromptBuilder(tokenizer)
    longest_doc = max(len(tokenizer.encode(p)) for p in source.paragraphs["test"]) + 16  # + planted fact + header
    for i in range(20):
        examples = [make_example(source, builder, "test", i, budget=b, seed=3) for b in (256, 512, 1024, 2048)]
        for ex in examples:
            assert ex.num_tokens <= ex.budget < ex.num_tokens + longest_doc
            assert ex.answers[0] in ex.documents[ex.gold_index]
        short, long = examples[0], examples[-1]
        assert {e.question for e in examples} == {short.question} and {e.answers for e in examples} == {short.answers}
        assert set(short.documents) - {short.documents[short.gold_index]} <= set(long.documents)
        assert short.documents[short.gold_index] == long.documents[long.gold_index]
        # The gold document sits at the same relative place among the documents at every length.
        k_short, k_long = len(short.documents), len(long.documents)
        if k_short > 1:
            assert abs(short.gold_index / (k_short - 1) - long.gold_index / (k_long - 1)) <= 0.5 / (k_short - 1) + 0.5 / (k_long - 1)
        assert 0.0 <= long.depth <= 1.0


@pytest.mark.parametrize("distractor_facts", ["other", "same"])
def test_embedded_question_is_answerable_from_exactly_one_document(tokenizer, distractor_facts: str) -> None:
    source = build_source(QADataConfig(distractor_facts=distractor_facts), tokenizer, documents=DOCS)
    builder = PromptBuilder(tokenizer)
    fact = re.compile(r"The (colour|size|texture) of the (\w+) is (\w+)\.")
    for i in range(50):
        ex = make_example(source, builder, "validation", i, budget=1024, seed=0)
        key = re.fullmatch(r"What is the colour of the (\w+)\?", ex.question).group(1)
        facts = [fact.findall(d) for d in ex.documents]
        assert all(len(f) == 1 for f in facts)  # one planted fact per document
        relations, keys, values = zip(*(f[0] for f in facts))
        assert len(set(keys)) == len(keys) and keys.index(key) == ex.gold_index
        assert relations[ex.gold_index] == "colour" and list(values) == list(ex.document_answers)
        others = [r for j, r in enumerate(relations) if j != ex.gold_index]
        assert set(others) <= ({"size", "texture"} if distractor_facts == "other" else {"colour"})
        assert ex.document_answers[ex.gold_index] == ex.answers[0] and ex.answers[0] in source.answer_set
        # Closed sets of single tokens: exact match measures retrieval, not spelling.
        assert len(tokenizer.encode(" " + ex.answers[0])) == 1 and len(tokenizer.encode(" " + key)) == 1
        assert ex.copy_rate == sum(a == ex.answers[0] for a in ex.document_answers) / len(ex.documents)
        if distractor_facts == "other":  # only the gold document names a colour
            assert ex.copy_rate == 1 / len(ex.documents)
        # Trained on the gold fact restated, whose last word is the answer (strict EM compares with it).
        assert ex.target == f"The colour of the {key} is {ex.answers[0]}." and ex.target in ex.documents[ex.gold_index]
        assert tokenizer.decode(ex.answer_ids[:-1]) == " " + ex.target and ex.answer_ids[-1] == tokenizer.eos_id


def test_value_answers_train_on_the_colour_alone(tokenizer) -> None:
    source = build_source(QADataConfig(answer_form="value"), tokenizer, documents=DOCS)
    ex = make_example(source, PromptBuilder(tokenizer), "test", 0, budget=512, seed=0)
    assert ex.target == ex.answers[0] and tokenizer.decode(ex.answer_ids) == f" {ex.answers[0]}<|endoftext|>"


def test_embedded_sets_are_the_single_token_words_and_too_few_is_a_clear_error(tokenizer) -> None:
    src = build_source(QADataConfig(min_chars=40, max_chars=100), tokenizer, documents=DOCS)
    assert set(src.keys) <= set(KEY_WORDS) and set(src.answer_set) <= set(VALUE_WORDS)
    assert not set(src.keys) & set(src.answer_set) and len(src.keys) >= MIN_KEYS
    assert all(len(tokenizer.encode(" " + w)) == 1 for w in src.keys + src.answer_set)
    plain = train_bpe(DOCS, 512)  # no glossary: few of the words are single tokens
    with pytest.raises(ValueError, match=r"lm_data.tokenizer: only \d+ of the embedded QA keys are one token long"):
        build_source(QADataConfig(), plain, documents=DOCS)


def test_distractors_end_when_the_keys_do(tokenizer) -> None:
    """A prompt never repeats a key: past len(keys) documents it stops short of its budget."""
    docs = [f"Passage number {i} says very little. It is only here to fill the prompt." for i in range(4000)]
    source = build_source(QADataConfig(min_chars=40), tokenizer, documents=docs)
    assert len(source.paragraphs["test"]) > len(source.keys)
    passages = list(source.item("test", 0, np.random.default_rng(0)).distractors)
    assert len(passages) == len(source.keys) - 1
    ex = PromptBuilder(tokenizer).build(source.item("test", 0, np.random.default_rng(0)), budget=100_000, depth=0.5)
    assert len(ex.documents) == len(source.keys) and ex.num_tokens < 100_000


def test_embedded_examples_are_seeded_and_splits_disjoint(tokenizer, source) -> None:
    builder = PromptBuilder(tokenizer)
    a = make_example(source, builder, "train", 7, budget=512, seed=0)
    b = make_example(source, builder, "train", 7, budget=512, seed=0)
    c = make_example(source, builder, "train", 7, budget=512, seed=1)
    assert a == b and a.prompt_ids != c.prompt_ids
    assert not set(source.paragraphs["train"]) & set(source.paragraphs["test"])
    assert not set(source.paragraphs["validation"]) & set(source.paragraphs["test"])


def test_plant_keeps_every_sentence() -> None:
    paragraph = "First one. Second one! Third one?"
    for seed in range(10):
        out = plant(paragraph, "The code of Marlow is 4821.", np.random.default_rng(seed))
        assert out.replace("The code of Marlow is 4821.", "").split() == paragraph.split()


def test_labels_mask_everything_but_answer_and_eos(tokenizer, source) -> None:
    builder = PromptBuilder(tokenizer)
    examples = [make_example(source, builder, "train", i, budget=300, seed=0) for i in range(6)]
    batch = collate_train(examples, pad_id=tokenizer.eos_id)
    ids, labels = batch["input_ids"], batch["labels"]
    for r, ex in enumerate(examples):
        p, a = len(ex.prompt_ids), len(ex.answer_ids)
        kept = (labels[r] != IGNORE_INDEX).nonzero()[:, 0].tolist()
        assert kept == list(range(p, p + a))
        assert labels[r, p : p + a].tolist() == ex.answer_ids == ids[r, p : p + a].tolist()
        assert labels[r, p + a - 1] == tokenizer.eos_id
        assert ids[r, :p].tolist() == ex.prompt_ids
        assert batch["lengths"][r] == p + a


def test_prompts_left_padded_with_positions_counting_real_tokens(tokenizer, source) -> None:
    builder = PromptBuilder(tokenizer)
    examples = [make_example(source, builder, "test", i, budget=b, seed=0) for i, b in enumerate((200, 300, 400))]
    batch = collate_prompts(examples, pad_id=tokenizer.eos_id)
    n = batch["input_ids"].shape[1]
    for r, ex in enumerate(examples):
        p = len(ex.prompt_ids)
        assert batch["input_ids"][r, n - p :].tolist() == ex.prompt_ids
        assert batch["attention_mask"][r].tolist() == [0] * (n - p) + [1] * p
        assert batch["position_ids"][r, n - p :].tolist() == list(range(p))


def test_too_small_budget_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(PromptTooLong, match=r"need \d+ tokens, more than the budget of 20"):
        PromptBuilder(tokenizer).build(_item("The code of Marlow is 4821.", []), budget=20, depth=0.0)
    with pytest.raises(ValueError, match="depth = 1.5"):
        PromptBuilder(tokenizer).build(_item("x", []), budget=500, depth=1.5)


# --- SQuAD through datasets, on a local SQuAD-format stand-in -----------------------------------------

def _squad_rows(prefix: str, n_contexts: int) -> list[dict]:
    rows = []
    for c in range(n_contexts):
        context = f"{prefix} paragraph {c}: the river Alder{c} flows past the town of Brook{c} into the sea."
        rows.append({"id": f"{prefix}{c}a", "title": "t", "context": context, "question": f"Which town does Alder{c} pass?",
                     "answers": {"text": [f"Brook{c}", f"the town of Brook{c}"], "answer_start": [0, 0]}})
        rows.append({"id": f"{prefix}{c}b", "title": "t", "context": context, "question": f"Where does Alder{c} flow?",
                     "answers": {"text": ["into the sea"], "answer_start": [0]}})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_squad_files_feed_the_same_builder(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    files = {"train": [_write_jsonl(tmp_path / "train.jsonl", _squad_rows("tr", 40))],
             "validation": [_write_jsonl(tmp_path / "dev.jsonl", _squad_rows("dev", 10))]}
    src = build_source(QADataConfig(source="files", data_files=files, valid_fraction=0.1), tokenizer)
    assert src.num_items("test") == 20
    assert src.num_items("train") + src.num_items("validation") == 80
    assert src.num_items("validation") == 8  # 4 of 40 paragraphs held out, 2 questions each
    train_ctx, val_ctx = set(src.splits["train"].contexts), set(src.splits["validation"].contexts)
    assert not train_ctx & val_ctx
    ex = make_example(src, PromptBuilder(tokenizer), "test", 3, budget=400, seed=0)
    assert ex.answers == ("Brook1", "the town of Brook1") or ex.answers == ("into the sea",)
    assert ex.documents[ex.gold_index].startswith("dev paragraph 1:")
    assert len(set(ex.documents)) == len(ex.documents) > 1
    assert all(d.startswith("dev ") for d in ex.documents)  # distractors come from the same split


def test_squad_errors_name_the_field(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="data_files"):
        QADataConfig(source="files")
    rows = [{"q": "x", "context": "y", "answers": {"text": ["z"]}}] * 3
    files = {"train": [_write_jsonl(tmp_path / "t.jsonl", rows)], "validation": [_write_jsonl(tmp_path / "v.jsonl", rows)]}
    with pytest.raises(ValueError, match=r"data field 'question' is not a column; columns: \['q', 'context', 'answers'\]"):
        build_source(QADataConfig(source="files", data_files=files), tokenizer)

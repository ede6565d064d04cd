"""Text corpora: the embedded default, local files, the Hugging Face loaders on local stand-ins, sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from seqpe_nd.tasks.data import text as td
from seqpe_nd.tasks.engine.trainer import first_sample
from seqpe_nd.tasks.data.text import TextDataConfig, prepare_text

WORDS = (
    "the position of a token is encoded by its digits and the encoder learns a smooth embedding "
    "for every coordinate so that longer contexts than those seen in training remain meaningful"
).split()


def document(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 40 + i % 7)) + "."


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> td.TextCorpus:
    return prepare_text(TextDataConfig(vocab_size=2048, cache_dir=tmp_path_factory.mktemp("cache")))


def test_embedded_corpus_needs_no_download(embedded: td.TextCorpus) -> None:
    meta = embedded.meta
    assert sum(meta["documents"].values()) > 500 and meta["tokens"]["train"] > 300_000
    assert meta["tokens"]["validation"] > 10_000 and meta["tokens"]["test"] > 10_000
    train = embedded.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and len(train) == meta["tokens"]["train"]
    tok = embedded.tokenizer
    sentence = "A call calls a callable object."
    assert tok.vocab_size == 2048 and tok.decode(tok.encode(sentence)) == sentence
    assert int(train.max()) < tok.vocab_size and (train == tok.eos_id).sum() == meta["documents"]["train"]
    text = tok.decode(embedded.block("train", 0, 200).tolist())
    assert text.isascii() or any(c.isalpha() for c in text)


def test_cache_is_reused_and_keyed_by_settings(
    embedded: td.TextCorpus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = TextDataConfig(vocab_size=2048, cache_dir=embedded.directory.parent.parent)

    def no_work(*args: object, **kwargs: object) -> int:
        raise AssertionError("the cached corpus was tokenized again")

    monkeypatch.setattr(td, "write_tokens", no_work)
    assert prepare_text(cfg).directory == embedded.directory
    assert td.cache_key(cfg.model_copy(update={"vocab_size": 1024})) != td.cache_key(cfg)
    assert td.cache_key(cfg.model_copy(update={"cache_dir": tmp_path})) == td.cache_key(cfg)
    monkeypatch.setenv("SEQPE_ND_CACHE", str(tmp_path))
    assert td.cache_root(TextDataConfig()) == tmp_path
    monkeypatch.delenv("SEQPE_ND_CACHE")
    assert td.cache_root(TextDataConfig()) == Path.home() / ".cache" / "seqpe-nd"


def test_split_by_document_is_deterministic_and_disjoint() -> None:
    a = td.split_documents(100, 0.1, 0.05, seed=3)
    assert a.keys() == {"train", "validation", "test"}
    assert [len(a[s]) for s in ("train", "validation", "test")] == [85, 10, 5]
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    b = td.split_documents(100, 0.1, 0.05, seed=3)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(td.split_documents(100, 0.1, 0.05, seed=4)["validation"], a["validation"])


def test_local_files_with_the_project_bpe(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    docs = [document(i) for i in range(60)]
    path.write_text("\n\n".join(docs))  # paragraphs: one document each
    cfg = TextDataConfig(source="files", data_files=[str(path)], vocab_size=300, cache_dir=tmp_path / "cache")
    corpus = prepare_text(cfg)
    assert corpus.meta["documents"] == {"train": 54, "validation": 3, "test": 3}
    idx = td.split_documents(60, 0.05, 0.05, seed=0)
    want = []
    for i in idx["validation"]:
        want += corpus.tokenizer.encode(docs[i]) + [corpus.tokenizer.eos_id]
    assert corpus.split("validation").tolist() == want  # documents in corpus order, EOS after each
    assert not list((corpus.directory).glob(".tmp-*"))


def test_hf_loader_on_a_local_dataset_and_a_local_hf_tokenizer(tmp_path: Path) -> None:
    """The WikiText/GPT-2 path, with a local data set directory and a tokenizer saved in HF format."""
    from transformers import PreTrainedTokenizerFast

    data = tmp_path / "data"
    data.mkdir()
    for split, (lo, hi) in {"train": (0, 40), "validation": (40, 45), "test": (45, 50)}.items():
        (data / f"{split}.txt").write_text("".join(document(i) + "\n" for i in range(lo, hi)))
    bpe = td.train_bpe([document(i) for i in range(40)], 300)
    hf_dir = tmp_path / "tok"
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="</s>")  # not GPT-2's EOS name
    hf.save_pretrained(hf_dir)

    cfg = TextDataConfig(
        source="hf", dataset=str(data), dataset_config=None, tokenizer=str(hf_dir), add_eos=False,
        cache_dir=tmp_path / "cache",
    )
    corpus = prepare_text(cfg)
    assert corpus.meta["documents"] == {"train": 40, "validation": 5, "test": 5}  # the given splits, one row a line
    assert corpus.tokenizer.eos_id == hf.eos_token_id == 300
    assert prepare_text(cfg).tokenizer.eos_id == 300  # and again from the cache
    want = [t for i in range(45, 50) for t in bpe.encode(document(i))]
    assert corpus.split("test").tolist() == want  # add_eos=False: rows are concatenated as WikiText's lines are


def test_files_given_per_split(tmp_path: Path) -> None:
    files = {}
    for split, (lo, hi) in {"train": (0, 30), "validation": (30, 33)}.items():
        p = tmp_path / f"{split}.txt"
        p.write_text("\n\n".join(document(i) for i in range(lo, hi)))
        files[split] = [str(p)]
    corpus = prepare_text(
        TextDataConfig(source="files", data_files=files, vocab_size=300, test_fraction=0.1, cache_dir=tmp_path / "c")
    )
    # validation as given; test carved out of the training documents
    assert corpus.meta["documents"] == {"train": 27, "validation": 3, "test": 3}


def test_blocks_are_packed_and_the_last_full_block_counts(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(document(i) for i in range(20)))
    corpus = prepare_text(
        TextDataConfig(source="files", data_files=[str(path)], vocab_size=300, valid_fraction=0, test_fraction=0,
                       cache_dir=tmp_path / "cache")
    )
    n = corpus.num_tokens("train")
    assert corpus.num_tokens("validation") == 0 and len(corpus.split("validation")) == 0
    length = next(d for d in range(7, n) if n % d == 0) if any(n % d == 0 for d in range(7, n)) else n
    assert corpus.num_blocks("train", length) == n // length
    last = corpus.block("train", n - length, length)
    assert last.dtype == torch.int64 and last.tolist() == corpus.split("train")[n - length :].tolist()
    blocks = corpus.blocks("train", [0, corpus.num_blocks("train", length) - 1], length)
    assert blocks.shape == (2, length) and torch.equal(blocks[1], last)
    with pytest.raises(ValueError, match="outside split 'train'"):
        corpus.block("train", n - length + 1, length)
    with pytest.raises(ValueError, match=r"unknown split 'dev'; allowed: \['train', 'validation', 'test'\]"):
        corpus.split("dev")


def test_sampling_is_stateless_and_covers_each_epoch() -> None:
    n = 13
    stream = td.sample_blocks(n, 0, 3 * n, seed=5)
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled each epoch
    pieces = np.concatenate([td.sample_blocks(n, first, 4, seed=5) for first in range(0, 3 * n, 4)])[: 3 * n]
    assert np.array_equal(pieces, stream)
    # a step's micro-batches on each rank tile the global sample stream without overlap
    starts = [first_sample(1, m, r, world=2, batch_size=4, grad_accum=2) for m in range(2) for r in range(2)]
    assert sorted(starts) == [16, 20, 24, 28]
    with pytest.raises(ValueError, match="no full block"):
        td.sample_blocks(0, 0, 1, seed=0)


def test_token_dtype_widens_for_large_vocabularies() -> None:
    assert td.token_dtype(50257) == np.uint16 and td.token_dtype(65536) == np.uint32


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="needs data.data_files"):
        TextDataConfig(source="files")
    with pytest.raises(ValidationError, match=r"unknown splits \['dev'\]"):
        TextDataConfig(source="files", data_files={"train": ["a"], "dev": ["b"]})
    with pytest.raises(ValidationError, match="vocab"):
        TextDataConfig(vocab_sise=10)  # type: ignore[call-arg]

"""Text corpora as memory-mapped token files: an embedded default, Hugging Face data sets, local files.

``prepare_text(cfg)`` returns a :class:`TextCorpus` whose splits are ``np.memmap`` arrays of
token ids, tokenized once and cached under ``cache_dir/text/<key>/`` (``key`` hashes the corpus
and tokenizer settings). The embedded default needs no download: English text that ships with
Python and timm (the ``pydoc`` topics, the docstrings of the standard library, and timm's
ImageNet synset glosses), tokenized with a byte-level BPE the project trains on the training split.

Token files are written in chunks to a temporary file and renamed into place, so a 100 M-token
corpus never sits in RAM twice. Batches are read as packed, non-overlapping blocks; the order of
training blocks is a pure function of ``(seed, epoch)`` (:func:`sample_blocks`), so a training
step can compute its blocks without iterator state.

Shapes: ``b`` blocks, ``n`` tokens per block.
"""

import ast
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm

from seqpe_nd.positions import Frozen
from seqpe_nd.tasks.data.hub import hub_dataset, hub_tokenizer
from seqpe_nd.tasks.engine.checkpoint import atomic_write_bytes

SPLITS: tuple[str, ...] = ("train", "validation", "test")
EOS = "<|endoftext|>"
# Bump when the embedded corpus recipe changes: it is part of the cache key.
EMBEDDED_VERSION = 1
_SYNSET_LINES_PER_DOC = 64
_ENCODE_BATCH = 1024  # documents per encode_batch call; bounds memory while tokenizing


class TextDataConfig(Frozen):
    """Where the text comes from, how it is tokenized and split (the ``data:`` section of a recipe)."""

    source: Literal["embedded", "hf", "files"] = "embedded"
    """``embedded``: text shipped with Python and timm; ``hf``: a Hugging Face data set; ``files``: local text files."""
    tokenizer: str = "bpe"
    """``bpe``: train the project's byte-level BPE on the training split; otherwise a Hugging Face
    tokenizer name or local path (e.g. ``gpt2``)."""
    vocab_size: int = Field(4096, ge=260)
    """Vocabulary of the project's BPE (ignored for a pretrained tokenizer)."""
    dataset: str = "wikitext"
    """``hf`` only: data set name for ``datasets.load_dataset``."""
    dataset_config: str | None = "wikitext-103-raw-v1"
    """``hf`` only: data set configuration name."""
    data_files: dict[str, list[str]] | list[str] | None = None
    """``files`` only: text files; a mapping ``{train: [...], validation: [...], test: [...]}`` keeps
    the given splits, a list is split by document."""
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """``files`` only: what one document is (``datasets``' text builder ``sample_by``)."""
    text_field: str = "text"
    """Column holding the text."""
    add_eos: bool = True
    """Append the end-of-text token after every document (off for WikiText, whose rows are lines)."""
    valid_fraction: float = Field(0.05, ge=0, lt=0.5)
    """Fraction of documents held out for validation when the source has no such split."""
    test_fraction: float = Field(0.05, ge=0, lt=0.5)
    """Fraction of documents held out for test when the source has no such split."""
    split_seed: int = 0
    """Seed of the document-level split."""
    cache_dir: Path | None = None
    """Cache root; default ``$SEQPE_ND_CACHE`` or ``~/.cache/seqpe-nd``."""

    @model_validator(mode="after")
    def _check(self) -> "TextDataConfig":
        if self.source == "files" and not self.data_files:
            raise ValueError("data.source 'files' needs data.data_files (a list of paths or {split: [paths]})")
        if isinstance(self.data_files, dict) and "train" not in self.data_files:
            raise ValueError(f"data.data_files needs a 'train' entry, got splits {sorted(self.data_files)}")
        if isinstance(self.data_files, dict):
            unknown = sorted(set(self.data_files) - set(SPLITS))
            if unknown:
                raise ValueError(f"data.data_files has unknown splits {unknown}; allowed: {list(SPLITS)}")
        return self


def cache_root(cfg: TextDataConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    env = os.environ.get("SEQPE_ND_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "seqpe-nd"


# --- tokenizer -----------------------------------------------------------------------------------

class TextTokenizer:
    """A ``tokenizers.Tokenizer`` (ours, or the fast backend of a Hugging Face tokenizer) with its EOS id."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.tokenizer.to_str().encode())

    @classmethod
    def load(cls, path: Path, eos_id: int | None = None) -> "TextTokenizer":
        """Read ``tokenizer.json``; the EOS id defaults to that of ``<|endoftext|>``."""
        tok = Tokenizer.from_file(str(path))
        eos = tok.token_to_id(EOS) if eos_id is None else eos_id
        if eos is None:
            raise ValueError(f"tokenizer {path} has no {EOS!r} token; pass its end-of-text id")
        return cls(tok, eos)


def train_bpe(texts: Sequence[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) with ``<|endoftext|>`` as the only special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, tok.token_to_id(EOS))


def load_pretrained_tokenizer(name: str, *, section: str = "data") -> TextTokenizer:
    """A Hugging Face tokenizer by hub name or local directory, through its fast (Rust) backend (``section``: the
    config section naming it, ``data`` or a QA run's ``lm_data``, for the HubUnavailableError)."""
    from transformers import AutoTokenizer  # heavy import, only on this path

    with hub_tokenizer(f"{section}.tokenizer", name, local=section == "data"):
        hf = AutoTokenizer.from_pretrained(name)
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast backend; the pipeline needs a `tokenizers` tokenizer")
    eos = hf.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no end-of-text token")
    return TextTokenizer(hf.backend_tokenizer, int(eos))


# --- documents -----------------------------------------------------------------------------------

def embedded_documents() -> list[str]:
    """The default corpus, in a fixed order: pydoc topics, stdlib docstrings, timm synset glosses."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    skip = {"this", "antigravity"}  # never even parsed: novelty modules
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            spec = importlib.util.find_spec(name)  # locates, does not import, a top-level module
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        parts = [d for node in _definitions(tree) if (d := ast.get_docstring(node))]
        if parts:
            docs.append("\n\n".join(parts))
    synsets = _synset_file()
    if synsets is not None:
        glosses = [line.split("\t", 1)[-1] for line in synsets.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i in range(0, len(glosses), _SYNSET_LINES_PER_DOC):
            docs.append("\n".join(glosses[i : i + _SYNSET_LINES_PER_DOC]))
    return docs


def _definitions(node: ast.AST) -> Iterator[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """The module and every class/function in it, in source order, through statements only.

    Docstrings live only there, and skipping expressions makes this several times faster than ``ast.walk``.
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _definitions(child)


def _synset_file() -> Path | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / "imagenet_synset_to_definition.txt"
    return path if path.is_file() else None


def _embedded_fingerprint() -> dict[str, Any]:
    # The embedded text depends on the Python and timm versions; hashing 3 MB of it on every call
    # would cost seconds, so the versions stand in for it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        timm_version = None
    return {"embedded": EMBEDDED_VERSION, "python": sys.version.split()[0], "timm": timm_version}


def split_documents(n_docs: int, valid_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic document-level split: indices per split, each in corpus order."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, round(n_docs * valid_fraction)) if valid_fraction > 0 and n_docs >= 3 else 0
    n_test = max(1, round(n_docs * test_fraction)) if test_fraction > 0 and n_docs >= 3 else 0
    return {
        "validation": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
        "train": np.sort(order[n_val + n_test :]),
    }


def _files_fingerprint(files: dict[str, list[str]] | list[str]) -> Any:
    def digest(path: str) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if isinstance(files, dict):
        return {k: [digest(p) for p in v] for k, v in sorted(files.items())}
    return [digest(p) for p in files]


def _load_split_texts(cfg: TextDataConfig, section: str = "data") -> dict[str, Sequence[str]]:
    """The documents of each split (lists, or ``datasets`` columns that stay on disk)."""
    if cfg.source == "embedded":
        docs = embedded_documents()
        idx = split_documents(len(docs), cfg.valid_fraction, cfg.test_fraction, cfg.split_seed)
        return {s: [docs[i] for i in idx[s]] for s in SPLITS}

    import datasets  # heavy import, only on these paths

    if cfg.source == "hf":
        local = ("read local text files instead (data.source: files with data.data_files: [a.txt, ...] or {train: "
                 "[...], validation: [...], test: [...]})") if section == "data" else None  # lm_data: must match the LM run
        with hub_dataset(f"{section}.dataset", cfg.dataset, config=cfg.dataset_config, local=local):
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
    else:
        files = cfg.data_files if isinstance(cfg.data_files, dict) else {"train": list(cfg.data_files or [])}
        ds = datasets.load_dataset("text", data_files=files, sample_by=cfg.sample_by)
    if cfg.text_field not in ds["train"].column_names:
        raise ValueError(f"data.text_field {cfg.text_field!r} is not a column; columns: {ds['train'].column_names}")
    if all(s in ds for s in SPLITS):
        return {s: ds[s][cfg.text_field] for s in SPLITS}
    # A held-out split the source lacks is carved out of the training documents; given ones are kept.
    train = ds["train"][cfg.text_field]
    valid_fraction = 0.0 if "validation" in ds else cfg.valid_fraction
    test_fraction = 0.0 if "test" in ds else cfg.test_fraction
    idx = split_documents(len(train), valid_fraction, test_fraction, cfg.split_seed)
    out: dict[str, Sequence[str]] = {"train": [train[int(i)] for i in idx["train"]]}
    for s in ("validation", "test"):
        out[s] = ds[s][cfg.text_field] if s in ds else [train[int(i)] for i in idx[s]]
    return out


# --- cache ---------------------------------------------------------------------------------------

def _files_under(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*") if p.is_file())


def cache_key(cfg: TextDataConfig) -> str:
    """Hash of every setting that changes the tokens (not the cache location)."""
    settings = cfg.model_dump(mode="json", exclude={"cache_dir"})
    if cfg.tokenizer != "bpe":
        settings.pop("vocab_size")
    if cfg.source == "embedded":
        settings["fingerprint"] = _embedded_fingerprint()
    elif cfg.source == "files":
        settings["fingerprint"] = _files_fingerprint(cfg.data_files or [])
    elif Path(cfg.dataset).is_dir():  # a local data set directory: its content, not its name
        settings["fingerprint"] = _files_fingerprint(_files_under(Path(cfg.dataset)))
    if cfg.tokenizer != "bpe" and Path(cfg.tokenizer).is_dir():
        settings["tokenizer_fingerprint"] = _files_fingerprint(_files_under(Path(cfg.tokenizer)))
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent ranks tokenize a corpus once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def write_tokens(
    path: Path, texts: Sequence[str], tokenizer: TextTokenizer, *, add_eos: bool, desc: str = "tokenize"
) -> int:
    """Tokenize ``texts`` chunk by chunk straight into a token file (atomic); returns its length."""
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    total = 0
    with open(tmp, "wb") as f, tqdm(total=len(texts), desc=desc, unit="doc", leave=False) as bar:
        for i in range(0, len(texts), _ENCODE_BATCH):
            chunk = list(texts[i : i + _ENCODE_BATCH])
            ids: list[int] = []
            for doc in tokenizer.encode_batch(chunk):
                ids.extend(doc)
                if add_eos:
                    ids.append(tokenizer.eos_id)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            total += len(ids)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return total


class TextCorpus:
    """Tokenized splits of one corpus, memory-mapped, and its tokenizer."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        self.tokenizer = TextTokenizer.load(self.directory / "tokenizer.json", eos_id=int(self.meta["eos_id"]))
        self.dtype = np.dtype(self.meta["dtype"])
        self._maps: dict[str, np.ndarray] = {}

    def split(self, name: str) -> np.ndarray:
        """Token ids of a split: a read-only ``np.memmap`` (an empty array for an empty split)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {list(SPLITS)}")
        if name not in self._maps:
            n = self.num_tokens(name)
            path = self.directory / f"{name}.bin"
            self._maps[name] = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        return self._maps[name]

    def num_tokens(self, split: str) -> int:
        return int(self.meta["tokens"][split])

    def num_blocks(self, split: str, length: int) -> int:
        """Full non-overlapping blocks of ``length`` tokens (the last full one included)."""
        return self.num_tokens(split) // length

    def block(self, split: str, start: int, length: int) -> Int[Tensor, " n"]:
        """Tokens ``[start, start + length)`` of a split as int64."""
        tokens = self.split(split)
        if start < 0 or start + length > len(tokens):
            raise ValueError(f"block [{start}, {start + length}) is outside split {split!r} of {len(tokens)} tokens")
        return torch.from_numpy(np.asarray(tokens[start : start + length], dtype=np.int64))

    def blocks(self, split: str, indices: Sequence[int] | np.ndarray, length: int) -> Int[Tensor, "b n"]:
        """Packed blocks ``i * length ...`` for each block index ``i``, stacked."""
        return torch.stack([self.block(split, int(i) * length, length) for i in indices])


def prepare_text(cfg: TextDataConfig, *, section: str = "data") -> TextCorpus:
    """Tokenize the corpus once (train the BPE if asked) and return the cached corpus. ``section`` (``data``, or
    a QA run's ``lm_data``) is named by the HubUnavailableError raised when the hub cannot give text or tokenizer."""
    directory = cache_root(cfg) / "text" / cache_key(cfg)
    if (directory / "meta.json").is_file():
        return TextCorpus(directory)
    with _locked(directory.with_name(directory.name + ".lock")):
        if (directory / "meta.json").is_file():  # another process finished it while we waited
            return TextCorpus(directory)
        # What may need the hub comes first (a hub data set, a pretrained tokenizer): either fails before local work.
        hub_texts = _load_split_texts(cfg, section) if cfg.source == "hf" else None
        tokenizer = None if cfg.tokenizer == "bpe" else load_pretrained_tokenizer(cfg.tokenizer, section=section)
        texts = hub_texts if hub_texts is not None else _load_split_texts(cfg, section)
        if tokenizer is None:
            tokenizer = train_bpe(texts["train"], cfg.vocab_size)  # on training text only: nothing leaks
        directory.mkdir(parents=True, exist_ok=True)  # once the text and tokenizer are had: no empty entry on failure
        tokenizer.save(directory / "tokenizer.json")
        counts = {s: write_tokens(directory / f"{s}.bin", texts[s], tokenizer, add_eos=cfg.add_eos,
                                  desc=f"tokenize {s}") for s in SPLITS}
        meta = {
            "config": cfg.model_dump(mode="json", exclude={"cache_dir"}),
            "tokens": counts,
            "documents": {s: len(texts[s]) for s in SPLITS},
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        }
        atomic_write_bytes(directory / "meta.json", json.dumps(meta, indent=1).encode())  # last: marks complete
    return TextCorpus(directory)


# --- stateless sampling --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: a pure function of ``(num_blocks, seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def sample_blocks(num_blocks: int, first: int, count: int, seed: int) -> np.ndarray:
    """Block indices of global samples ``first .. first + count - 1``, epoch after epoch.

    A training step's samples are numbered ``((step * grad_accum + micro) * world + rank) * batch + j``,
    so every rank computes its own blocks, and a resumed run its next ones, from the step alone.
    """
    if num_blocks <= 0:
        raise ValueError("the training split has no full block; use a shorter block length or more text")
    out = np.empty(count, dtype=np.int64)
    for j in range(count):
        epoch, pos = divmod(first + j, num_blocks)
        out[j] = epoch_order(num_blocks, seed, epoch)[pos]
    return out


def load_tokenizer(data: TextDataConfig, *, section: str = "data") -> TextTokenizer:
    """The LM run's tokenizer: the project BPE of its corpus (cached), or a Hugging Face one by name (``section``:
    ``data``, or a QA run's ``lm_data``, for error messages)."""
    if data.tokenizer == "bpe":
        return prepare_text(data, section=section).tokenizer
    return load_pretrained_tokenizer(data.tokenizer, section=section)

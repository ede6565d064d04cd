"""Compile-clean: a model with a position encoding breaks torch.compile's graph no more often than the stock model.

``benchmarks/graph_breaks.py`` counts the breaks with ``torch._dynamo.explain`` (training forward with labels,
the PE's auxiliary loss included, and evaluation forward; GPT-2 and Llama with the 1-D methods, timm's ViT with
the 2-D ones). It runs in a fresh interpreter: the tests' own runtime type checks (beartype through jaxtyping's
import hook) would add breaks of their own. Value checks on inputs run only where reading values is free (eager,
CPU: ``seqpe_nd.encodings.base.host_readable``). SeqPE's training forward takes its regularizer positions drawn
ahead on the host (``pe_draws``), and compiled it encodes positions without deduplication; compiled, APE-learn
resamples its table to the grid the input's shape gives, or reads it as it is (checked on the device).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, pe_sizes

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["nope", "ape_sin", "ape_learn", "rope", "alibi", "seqpe", "rope_axial", "rope_mixed", "alibi_nd"]


def graph_breaks(out: Path, *args: str) -> dict:
    """``benchmarks/graph_breaks.py ARGS`` in a fresh interpreter; what it wrote."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "graph_breaks.py"), *args, "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Graph breaks and compiled-vs-eager of every method."""
    return graph_breaks(tmp_path_factory.mktemp("breaks") / "breaks.json", "--methods", *METHODS)


def test_causal_lms_with_a_pe_break_no_more_than_stock(measured: dict) -> None:
    counts = measured["rows"]
    stock = {(r["backbone"], r["mode"]): r["breaks"] for r in counts if r["method"] == "stock"}
    rows = [r for r in counts if r["backbone"] in ("gpt2", "llama") and r["method"] != "stock"]
    assert {r["method"] for r in rows} == {"nope", "ape_sin", "ape_learn", "rope", "alibi", "seqpe"} and len(rows) == 24
    worse = [(r["backbone"], r["method"], r["mode"], r["breaks"], r["where"]) for r in rows
             if r["breaks"] > stock[r["backbone"], r["mode"]]]
    assert not worse, f"more graph breaks than the stock model: {worse}"


def test_vit_with_a_2d_pe_is_one_graph(measured: dict) -> None:
    rows = [r for r in measured["rows"] if r["backbone"] == "vit"]
    assert len(rows) == 14 and {"seqpe", "ape_learn"} < {r["method"] for r in rows}
    assert all(r["breaks"] == 0 for r in rows), [(r["method"], r["mode"], r["where"]) for r in rows if r["breaks"]]


def test_seqpe_forwards_have_no_break_of_their_own(measured: dict) -> None:
    """SeqPE, training (regularizers included, on positions drawn ahead) and evaluation, on GPT-2, Llama and the
    ViT: one graph each, fewer breaks than the stock GPT-2's one."""
    rows = [r for r in measured["rows"] if r["method"] == "seqpe"]
    assert len(rows) == 6, rows
    assert all(r["breaks"] == 0 for r in rows), [(r["backbone"], r["mode"], r["where"]) for r in rows if r["breaks"]]


def test_input_checks_stay_in_eager_mode_on_the_cpu() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_positions=32,
                                       bos_token_id=None, eos_token_id=None))
    space = {"L": [16], "L_max": [256]}
    attach_position_encoding(model, build_position_encoding({"method": "rope"}, space=space, **pe_sizes(model)))
    with pytest.raises(ValueError, match=r"outside the vocabulary 0\.\.63"):
        model(input_ids=torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="negative coordinate"):
        model(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[-1, 0]]))


def test_compiled_equals_eager(measured: dict) -> None:
    """torch.compile (aot_eager) gives eager's logits and loss with labels, training (the PE's regularizers: eager
    on a generator, compiled on what a generator seeded alike drew ahead) and evaluation, for every 1-D method."""
    rows = measured["compiled"]
    assert {r["method"] for r in rows} == {"nope", "ape_sin", "rope", "alibi", "ape_learn", "seqpe"} and len(rows) == 12
    assert all(r["logits_max_abs_diff"] <= 1e-5 and r["loss_abs_diff"] <= 1e-5 for r in rows), rows

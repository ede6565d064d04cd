"""Hugging Face causal LMs with a PE: attach to a GPT-2 instance, save_pretrained and load back exactly (Auto classes,
GPT2WithPE.from_pretrained) for every 1-D method on GPT-2 and Llama; what the stock class says of such a directory."""

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from seqpe_nd.encodings import RoPE, build_position_encoding
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE
from seqpe_nd.tasks.backbones.huggingface import attach_position_encoding

VOCAB, LAYERS, HEADS, WIDTH = 64, 2, 2, 32
SPACE = load_space({"L": 32, "L_max": 2000})
PE_CONFIGS = {
    "nope": {"method": "nope"},
    "ape_sin": {"method": "ape_sin"},
    "ape_learn": {"method": "ape_learn"},
    "rope": {"method": "rope"},
    "alibi": {"method": "alibi"},
    "seqpe": {"method": "seqpe", "hidden": 32, "layers": 1},
}
MODELS = ("gpt2", "gpt2_attached", "llama_attached")


def gpt2_config(**extra) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, n_positions=32,
                      initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=0, **extra)


def llama_config(cls=LlamaConfig) -> LlamaConfig:
    return cls(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3,
               pad_token_id=0, bos_token_id=None, eos_token_id=None)


def make_pe(method: str, seed: int = 5):
    torch.manual_seed(seed)
    pe = build_position_encoding(PE_CONFIGS[method], space=SPACE, num_heads=HEADS, head_dim=WIDTH // HEADS,
                                 num_layers=LAYERS, d_model=WIDTH)
    with torch.no_grad():  # position parameters as large as the backbone's, so positions matter for the logits
        for p in pe.parameters():
            p.normal_(0.0, 0.3)
    return pe


def make_model(kind: str, method: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2WithPE(gpt2_config(), make_pe(method)).eval()
    if kind == "gpt2_attached":
        return attach_position_encoding(GPT2LMHeadModel(gpt2_config()), make_pe(method)).eval()
    if kind == "qwen2_attached":
        return attach_position_encoding(Qwen2ForCausalLM(llama_config(Qwen2Config)), make_pe(method)).eval()
    return attach_position_encoding(LlamaForCausalLM(llama_config()), make_pe(method)).eval()


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# -- attach to a GPT-2 instance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(PE_CONFIGS))
def test_attaching_to_a_gpt2_instance_equals_gpt2withpe_with_the_same_weights(method: str) -> None:
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(gpt2_config()).eval()
    pe = make_pe(method)
    want_model = GPT2WithPE(gpt2_config(), copy.deepcopy(pe)).eval()
    weights = {k: v for k, v in stock.state_dict().items() if not k.startswith("transformer.wpe.")}
    want_model.load_state_dict(weights | {f"pe.{k}": v for k, v in pe.state_dict().items()})
    model = attach_position_encoding(stock, pe)
    assert type(model) is GPT2WithPE and model is stock
    assert not any(k.startswith("transformer.wpe.") for k in model.state_dict())
    ids = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_model(ids).logits)


def test_nope_attached_to_gpt2_is_stock_gpt2_without_its_position_table() -> None:
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(gpt2_config(attn_implementation="eager")).eval()
    reference = copy.deepcopy(stock)
    with torch.no_grad():
        reference.transformer.wpe.weight.zero_()  # the naive reference: GPT-2 with no position information
    model = attach_position_encoding(stock, make_pe("nope"))
    ids = tokens(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_attaching_to_gpt2_keeps_its_config_checks() -> None:
    stock = GPT2LMHeadModel(gpt2_config(reorder_and_upcast_attn=True))
    with pytest.raises(ValueError, match="reorder_and_upcast_attn = True is not supported"):
        attach_position_encoding(stock, make_pe("rope"))
    assert type(stock) is GPT2LMHeadModel and type(stock.config) is GPT2Config  # refused before any change
    small = build_position_encoding({"method": "rope"}, space=SPACE, num_heads=4, head_dim=8, num_layers=LAYERS,
                                    d_model=WIDTH)
    with pytest.raises(ValueError, match="PE sized for 2 layers x 4 heads x 8 dims, the model has 2 x 2 x 16"):
        attach_position_encoding(GPT2LMHeadModel(gpt2_config()), small)


# -- save and load -----------------------------------------------------------------------------------------------

def assert_same_model(saved, loaded) -> None:
    """Same class, every parameter and buffer equal (non-persistent ones included), same logits, and greedy decoding
    with the cache equal to the full forward's argmax and to the saved model's."""
    assert type(loaded) is type(saved)
    for (name, a), (name_b, b) in zip(saved.named_buffers(), loaded.named_buffers(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    for (name, a), (name_b, b) in zip(saved.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    ids = tokens(2, 14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, saved(ids).logits)
        assert torch.equal(loaded(ids, attention_mask=mask).logits, saved(ids, attention_mask=mask).logits)
        prompt = tokens(2, 5, seed=3)
        kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
        cached = loaded.generate(prompt, use_cache=True, **kwargs)
        full = loaded(cached, use_cache=False).logits
        assert torch.equal(full[:, 4:-1].argmax(-1), cached[:, 5:])  # each new token is the full forward's argmax
        assert torch.equal(cached, saved.generate(prompt, use_cache=True, **kwargs))


@pytest.mark.parametrize("method", sorted(PE_CONFIGS))
@pytest.mark.parametrize("kind", MODELS)
def test_save_pretrained_then_auto_from_pretrained_gives_the_same_model(kind: str, method: str, tmp_path: Path) -> None:
    model = make_model(kind, method)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == ("seqpe_nd_gpt2" if kind.startswith("gpt2") else "seqpe_nd_llama")
    assert saved["position_encoding"] == {
        "config": model.pe.spec.config.model_dump(mode="json"), "space": SPACE.model_dump(mode="json"),
    }
    assert load_space(saved["position_encoding"]["space"]) == SPACE
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path).eval())


def test_other_llama_families_save_and_load_too(tmp_path: Path) -> None:
    model = make_model("qwen2_attached", "seqpe")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "seqpe_nd_qwen2"
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path).eval())


@pytest.mark.parametrize("method", sorted(PE_CONFIGS))
def test_gpt2withpe_from_pretrained_rebuilds_every_buffer(method: str, tmp_path: Path) -> None:
    model = make_model("gpt2", method)
    model.save_pretrained(tmp_path)
    assert_same_model(model, GPT2WithPE.from_pretrained(tmp_path).eval())
    given = make_pe(method, seed=9)  # the same PE, other weights: the checkpoint's are loaded into it
    loaded = GPT2WithPE.from_pretrained(tmp_path, pe=given).eval()
    assert loaded.pe is given
    assert_same_model(model, loaded)


def test_rebuilt_buffers_are_the_formulas() -> None:
    """Buffers after loading against formulas written here: RoPE θ_i = 10000^(-2i/e), Press et al.'s slopes 2^(-8h/H)
    (H a power of two), SeqPE's place ids (digit slot of each token, none for [CLS]), whatever the buffers held."""
    e = WIDTH // HEADS
    for method, check in {
        "rope": lambda pe: torch.testing.assert_close(
            pe.inv_freq, torch.tensor([10000.0 ** (-2 * i / e) for i in range(e // 2)]), rtol=1e-6, atol=0),
        "alibi": lambda pe: torch.testing.assert_close(
            pe.slopes, torch.tensor([2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)]), rtol=0, atol=0),
        "seqpe": lambda pe: (  # 1-D, positions < 2000: 4 digit slots then [CLS]; no dimension ids in 1-D (App. A.1)
            torch.testing.assert_close(pe.encoder.place_ids, torch.tensor([0, 1, 2, 3, -1]), rtol=0, atol=0),
            torch.testing.assert_close(pe.encoder.dim_ids, torch.full((5,), -1), rtol=0, atol=0),
        ),
    }.items():
        model = make_model("gpt2", method)
        with torch.no_grad():
            for buffer in model.pe.buffers():
                buffer.fill_(7)  # what uninitialised memory might hold
            model.pe.apply(lambda m: m.reset_buffers() if hasattr(m, "reset_buffers") else None)
        check(model.pe)


def test_loading_with_another_pe_names_the_differing_field(tmp_path: Path) -> None:
    make_model("gpt2", "rope").save_pretrained(tmp_path)
    other = build_position_encoding({"method": "rope", "base": 500.0}, space=SPACE, num_heads=HEADS,
                                    head_dim=WIDTH // HEADS, num_layers=LAYERS, d_model=WIDTH)
    with pytest.raises(ValueError, match=r"config\.base: recorded 10000\.0, given 500\.0"):
        GPT2WithPE.from_pretrained(tmp_path, pe=other)


def test_a_pe_built_by_hand_attaches_but_is_not_saved_without_its_config(tmp_path: Path) -> None:
    pe = RoPE(base=10_000.0, width=1, num_heads=HEADS, head_dim=WIDTH // HEADS, num_layers=LAYERS)
    model = attach_position_encoding(LlamaForCausalLM(llama_config()), pe)
    with pytest.raises(ValueError, match="build it with build_position_encoding"):
        model.save_pretrained(tmp_path)


def test_the_stock_class_says_the_checkpoint_is_not_its_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_model("llama_attached", "alibi").save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        stock = LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(stock) is LlamaForCausalLM
    text = caplog.text
    assert "model of type `seqpe_nd_llama` to instantiate a model of type `llama`" in text
    assert "pe.slopes" not in text  # a non-persistent buffer is never saved; the PE's weights would be listed
    make_model("llama_attached", "ape_learn").save_pretrained(tmp_path / "ape")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LlamaForCausalLM.from_pretrained(tmp_path / "ape")
    assert "pe.table" in caplog.text and "UNEXPECTED" in caplog.text


def test_without_the_registration_the_auto_class_refuses_the_model_type(tmp_path: Path) -> None:
    make_model("gpt2", "rope").save_pretrained(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # a local directory: nothing to download
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0 and "model type `seqpe_nd_gpt2`" in run.stderr, run.stderr[-2000:]


def test_attach_is_still_importable_from_causal_lm() -> None:
    from seqpe_nd.tasks.backbones import causal_lm

    assert causal_lm.attach_position_encoding is attach_position_encoding

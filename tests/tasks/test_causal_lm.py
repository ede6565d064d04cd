"""Any position encoding in Llama-family Hugging Face models: stock parity, GQA, padding, cached decoding, SeqPE training."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from seqpe_nd.encodings import METHODS, build_position_encoding
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.backbones.huggingface import attach_position_encoding

VOCAB, LAYERS, HEADS, KV_HEADS, WIDTH, BASE = 97, 2, 4, 2, 64, 10_000.0
SPACE = load_space({"L": 64, "L_max": 2000})
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def config(family: str):
    cls, _ = FAMILIES[family]
    return cls(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
               rope_parameters={"rope_type": "default", "rope_theta": BASE}, pad_token_id=0, bos_token_id=1,
               eos_token_id=None, attn_implementation="sdpa")


def pair(family: str, pe_config: dict, seed: int = 0):
    """(stock model, the same weights with ``pe`` attached)."""
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    stock = model_cls(config(family)).eval()
    model = model_cls(config(family)).eval()
    model.load_state_dict(stock.state_dict())
    pe = build_position_encoding(pe_config, space=SPACE, num_heads=HEADS, head_dim=WIDTH // HEADS, num_layers=LAYERS,
                                 d_model=WIDTH)
    with torch.no_grad():
        for p in pe.parameters():  # position parameters as large as the backbone's, so positions matter
            p.normal_(0.0, 0.3)
    return stock, attach_position_encoding(model, pe).eval()


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rope_at_the_models_base_equals_the_stock_model(family: str) -> None:
    stock, model = pair(family, {"method": "rope", "base": BASE})
    ids = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=0, atol=1e-5)
        pos = torch.arange(7, 27).expand(2, 20)  # explicit positions
        torch.testing.assert_close(model(ids, position_ids=pos).logits, stock(ids, position_ids=pos).logits,
                                   rtol=0, atol=1e-5)
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, :6] = 0  # left padding
        got, want = model(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1, 6:], want[1, 6:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m in ("nope", "ape_sin", "ape_learn", "rope", "alibi", "seqpe")])
def test_cached_greedy_decoding_equals_the_full_forward(method: str) -> None:
    pe_config = {"method": method, **({"hidden": 32, "layers": 1} if method == "seqpe" else {})}
    _, model = pair("llama", pe_config)
    prompt = tokens(2, 6, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        plain = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(cached, plain)
        full = model(cached, use_cache=False).logits
        out = model(cached[:, :9], use_cache=True)
        step = model(cached[:, 9:], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([out.logits, step], 1), full, rtol=1e-4, atol=1e-4)


def test_a_seqpe_training_step_reaches_the_encoder() -> None:
    _, model = pair("llama", {"method": "seqpe", "hidden": 32, "layers": 1, "alpha": 0.1, "beta": 0.1})
    model.train()
    ids = tokens(2, 16)
    out = model(ids, labels=ids, pe_generator=torch.Generator().manual_seed(0))
    assert out.pe_aux_loss is not None and out.pe_aux_loss > 0
    out.loss.backward()  # with labels in training, loss = lm_loss + pe_aux_loss
    grads = [p.grad for p in model.pe.encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_unsupported_models_and_sizes_are_named() -> None:
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64))
    pe = build_position_encoding({"method": "rope"}, space=SPACE, num_heads=2, head_dim=8, num_layers=1, d_model=16)
    families = (r"GPT-2 family \(GPT2LMHeadModel\) and the Llama family "
                r"\(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM")
    with pytest.raises(ValueError, match=rf"supports .* {families}.*got OPTForCausalLM"):
        attach_position_encoding(opt, pe)
    llama = LlamaForCausalLM(config("llama"))
    with pytest.raises(ValueError, match="PE sized for 1 layers x 2 heads x 8 dims, the model has 2 x 4 x 16"):
        attach_position_encoding(llama, pe)
    assert type(llama) is LlamaForCausalLM and type(llama.config) is LlamaConfig  # refused before any change
    _, model = pair("llama", {"method": "rope"})
    with pytest.raises(ValueError, match="already has a position encoding"):
        attach_position_encoding(model, pe)


def test_the_lm_recipe_trains_and_evaluates_a_llama(tmp_path) -> None:
    """``model: {arch: llama}`` in a run config: the same recipe, data and evaluation on a Llama backbone."""
    from seqpe_nd.tasks.engine.trainer import train
    from seqpe_nd.tasks.recipes.lm import LMConfig, LMRecipe
    from tests.tasks.test_lm import tiny_config

    config = tiny_config(tmp_path, pe={"method": "seqpe", "hidden": 32, "layers": 1}, steps=2, save_every=0)
    config["model"] |= {"arch": "llama", "kv_heads": 1}
    cfg = LMConfig.parse(config)
    task = LMRecipe.build_task(cfg, tmp_path / "run")
    assert type(task.build_model()).__name__ == "LlamaForCausalLMWithPE"
    result = train(task, cfg.train, tmp_path / "run")
    assert result["step"] == 2 and "train/loss_delta" in result
    out = LMRecipe.evaluate(tmp_path / "run", lengths=[16, 32], quiet=True)
    assert set(out["lengths"]) == {"16", "32"} and all(r["ppl"] > 1 for r in out["lengths"].values())
    with pytest.raises(ValueError, match="kv_heads = 3 needs arch: llama and must divide n_head = 2"):
        LMConfig.parse({**config, "model": {**config["model"], "kv_heads": 3}})

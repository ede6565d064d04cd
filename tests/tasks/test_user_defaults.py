"""Issue 23, story 3: defaults that fit the user's own model — SeqPE's width, ``pe_sizes`` for any Hugging Face
causal LM config (Qwen2 has no ``head_dim``), and ``param_groups`` for a user's own optimizer (the trainer's)."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from seqpe_nd.encodings import PositionEncoding, build_position_encoding
from seqpe_nd.tasks.backbones.huggingface import attach_position_encoding, pe_sizes
from seqpe_nd.tasks.engine.param_groups import param_groups
from seqpe_nd.tasks.engine.trainer import build_optimizer
from seqpe_nd.tasks.recipes import lm
from tests.tasks.test_lm import tiny_config

SPACE = {"L": 16, "L_max": 256, "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
SEQPE = {"method": "seqpe", "layers": 1}  # no hidden: the model's width
VOCAB = 64


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def tiny_qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2}


def test_pe_sizes_of_configs_and_models() -> None:
    want = dict(num_heads=4, head_dim=8, num_layers=2, d_model=32)
    for build in MODELS.values():
        model = build()
        assert pe_sizes(model) == pe_sizes(model.config) == want
    qwen = tiny_qwen2().config
    assert not hasattr(qwen, "head_dim")  # the README user's AttributeError: derived, not read
    llama = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, head_dim=16)
    assert pe_sizes(llama)["head_dim"] == 16  # a config's own head_dim wins
    with pytest.raises(ValueError, match="GPT2Config"):
        pe_sizes(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_seqpe_without_hidden_fits_the_model_through_pe_sizes(arch: str) -> None:
    """README flow with any family: build with ``**pe_sizes(model)``, attach, train a step; the encoder is as wide
    as the model (32), not 768, so a tiny model gets a small encoder."""
    torch.manual_seed(0)
    model = MODELS[arch]()
    size = sum(p.numel() for p in model.parameters())
    pe = build_position_encoding(SEQPE, space=SPACE, **pe_sizes(model))
    assert pe.encoder.config["hidden"] == 32 and pe.encoder.tok.weight.shape[1] == 32
    assert sum(p.numel() for p in pe.encoder.parameters()) < size
    attach_position_encoding(model, pe)
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(input_ids=ids, labels=ids)
    loss = out.loss  # the LM loss plus the PE's auxiliary loss
    assert torch.isfinite(loss)
    loss.backward()
    assert pe.encoder.proj.weight.grad is not None


def test_user_optimizer_honours_the_encoder_rate() -> None:
    """A user's AdamW on ``param_groups``: the encoder's first Adam step is ≈ ``encoder_lr_max`` (3e-4 by
    default), the rest ≈ the run's rate; biases, norms and the PE train without decay."""
    torch.manual_seed(0)
    model = attach_position_encoding(tiny_gpt2(), build_position_encoding(SEQPE, space=SPACE, **pe_sizes(tiny_gpt2())))
    lr = 1e-2
    groups = param_groups(model, lr, 0.1)
    encoder = {id(p) for p in model.pe.encoder.parameters()}
    pe_params = {id(p) for p in model.pe.parameters()}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
        ids = {id(p) for p in g["params"]}
        assert g["lr_scale"] == (pytest.approx(3e-4 / lr) if ids & encoder else 1.0)
        assert not (ids & encoder) or ids <= encoder
        if g["weight_decay"]:
            assert not ids & pe_params and all(p.ndim >= 2 for p in g["params"])
    assert model.transformer.wte.weight in groups[0]["params"]  # token embeddings decay, as in the trainer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["pe.encoder.proj.weight"] == pytest.approx(3e-4, rel=0.05)
    assert moved["transformer.h.0.attn.c_attn.bias"] == pytest.approx(lr, rel=0.05)


def test_trainer_groups_are_the_public_function_s(tmp_path: Path) -> None:
    """One mechanism: the trainer's AdamW groups for a tiny SeqPE GPT-2 (LM recipe) are ``param_groups`` with
    the defaults — same groups, same order, same parameters, same rate scale and decay — and the split is the
    recipe's: decay for 2-D weights outside the PE, the encoder at min(1, encoder_lr_max / lr)."""
    config = tiny_config(tmp_path, pe={"method": "seqpe", "layers": 1})
    config["train"] = {**config["train"], "lr": 1e-3, "weight_decay": 0.1}
    cfg = lm.LMConfig.parse(config)
    task = lm.LMRecipe(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.pe.encoder.config["hidden"] == cfg.model.n_embd == 32
    trainer = build_optimizer(model, task, cfg.train).param_groups
    public = param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    assert len(trainer) == len(public) == 3
    for got, want in zip(trainer, public, strict=True):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert (got["lr"], got["lr_scale"], got["weight_decay"]) == (want["lr"], want["lr_scale"], want["weight_decay"])
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt, encoder = ([names[id(p)] for p in g["params"]] for g in trainer)
    assert [g["lr_scale"] for g in trainer] == [1.0, 1.0, pytest.approx(0.3)]
    assert [g["weight_decay"] for g in trainer] == [0.1, 0.0, 0.0]
    pe_modules = [m for m in model.modules() if isinstance(m, PositionEncoding)]
    assert len(pe_modules) == 1
    assert decayed == [n for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("pe.")]
    assert encoder == [f"pe.encoder.{n}" for n, _ in model.pe.encoder.named_parameters()]
    assert set(exempt) == {n for n in names.values() if n not in decayed and n not in encoder}

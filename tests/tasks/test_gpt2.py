"""The GPT-2 adapter: stock equivalence, cached decoding, left padding, for every method."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

from seqpe_nd.encodings import METHODS, build_position_encoding, draws_of
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.backbones.gpt2 import GPT2WithPE, NoPositionLookup

VOCAB, LAYERS, HEADS, WIDTH, TABLE = 61, 2, 2, 32, 32
SPACE = load_space({"kind": "grid", "L": TABLE, "L_max": 2000})
CONFIG = dict(
    vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, n_positions=TABLE, initializer_range=0.3,
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)

# Every registered method (SeqPE with the paper's LM integration), and the other SeqPE variants.
PE_CONFIGS = {m: {"method": m} for m in METHODS if m != "seqpe"} | {
    "seqpe": {"method": "seqpe", "integration": "attn_bias", "hidden": 32},
}
VARIANTS = PE_CONFIGS | {
    "rope-1e6": {"method": "rope", "base": 1e6},
    **{f"seqpe-{i}": {"method": "seqpe", "integration": i, "hidden": 32} for i in ("attn_sum", "attn_mul", "input_add")},
    "seqpe-per-layer": {"method": "seqpe", "integration": "attn_mul", "per_layer": True, "hidden": 32},
}


def make_model(pe_config: dict, seed: int = 0) -> GPT2WithPE:
    torch.manual_seed(seed)
    pe = build_position_encoding(pe_config, space=SPACE, num_heads=HEADS, head_dim=WIDTH // HEADS, num_layers=LAYERS, d_model=WIDTH)
    model = GPT2WithPE(GPT2Config(**CONFIG), pe)
    with torch.no_grad():  # position parameters as large as the backbone's, so positions matter for the logits
        for p in model.pe.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def test_wpe_seam_replaces_the_lookup() -> None:
    model = make_model({"method": "rope"})
    assert isinstance(model.transformer.wpe, NoPositionLookup)
    assert not any(name.startswith("transformer.wpe") for name, _ in model.named_parameters())


def test_learned_ape_reproduces_stock_gpt2_exactly() -> None:
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(**CONFIG, attn_implementation="sdpa")).eval()
    model = make_model({"method": "ape_learn"})
    weights = stock.state_dict()
    weights["pe.table"] = weights.pop("transformer.wpe.weight")  # same table, other seat
    model.load_state_dict(weights)
    ids = tokens(3, TABLE)
    with torch.no_grad():
        want = stock(ids).logits
        got = model(ids).logits
        assert torch.equal(got, want)
        # Cached decoding of the second half also matches the stock model's full forward.
        first = model(ids[:, :20], use_cache=True)
        step = model(ids[:, 20:], cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(step, want[:, 20:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_full_forward(name: str) -> None:
    model = make_model(VARIANTS[name])
    ids = tokens(2, 14)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        parts = [out.logits]
        for lo, hi in ((6, 7), (7, 10), (10, 11), (11, 14)):  # single tokens and chunks
            out = model(ids[:, lo:hi], cache=out.cache, use_cache=True)
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(PE_CONFIGS))
def test_generate_with_cache_equals_without(name: str) -> None:
    model = make_model(PE_CONFIGS[name])
    prompt = tokens(2, 5, seed=2)
    kwargs = dict(max_new_tokens=9, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        plain = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, plain)
    assert cached.shape == (2, 14)


@pytest.mark.parametrize("name", sorted(PE_CONFIGS))
def test_left_padding_equals_unpadded_rows(name: str) -> None:
    model = make_model(PE_CONFIGS[name])
    lengths = (9, 6)
    rows = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, **kwargs)
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(padded[i, width - len(row):], alone, rtol=1e-4, atol=1e-4)
            assert torch.equal(generated[i, width:], model.generate(row[None], **kwargs)[0, len(row):])


@pytest.mark.parametrize("name", ["rope", "alibi", "seqpe", "ape_sin"])
def test_shifted_start_is_tracked_through_the_cache(name: str) -> None:
    """Explicit positions far from 0 (the training shift): the cache keeps them, not its length."""
    model = make_model(PE_CONFIGS[name])
    ids = tokens(2, 10)
    pos = torch.arange(1000, 1010).expand(2, 10)
    with torch.no_grad():
        full = model(ids, position_ids=pos).logits
        out = model(ids[:, :4], position_ids=pos[:, :4], use_cache=True)
        rest = model(ids[:, 4:], cache=out.cache, use_cache=True).logits  # positions continue after 1003
        at_zero = model(ids).logits
    torch.testing.assert_close(rest, full[:, 4:], rtol=1e-4, atol=1e-4)
    if name in ("ape_sin", "seqpe"):  # absolute methods must see the shift
        assert not torch.allclose(full, at_zero, atol=1e-3)


def test_untracked_cache_is_refused() -> None:
    model = make_model({"method": "rope"})
    with torch.no_grad():
        out = model(tokens(1, 4), use_cache=True)
        foreign = DynamicCache(config=model.config)
        for layer in range(LAYERS):
            foreign.update(out.cache.layers[layer].keys, out.cache.layers[layer].values, layer)
        with pytest.raises(ValueError, match="positions were recorded for 0"):  # never guessed from its length
            model(tokens(1, 1), cache=foreign, use_cache=True)


def test_unsupported_gpt2_options_are_named() -> None:
    pe = build_position_encoding({"method": "nope"}, space=SPACE, num_heads=HEADS, head_dim=16, num_layers=LAYERS, d_model=WIDTH)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        GPT2WithPE(GPT2Config(**CONFIG, reorder_and_upcast_attn=True), pe)


def test_training_forward_returns_the_pe_aux_loss() -> None:
    model = make_model({"method": "seqpe", "hidden": 32}).train()
    ids = tokens(2, TABLE)
    out = model(ids, use_cache=False, pe_generator=torch.Generator().manual_seed(0))
    assert out.pe_aux_loss is not None and out.pe_aux_loss.ndim == 0
    (out.logits.float().logsumexp(-1).mean() + out.pe_aux_loss).backward()
    assert model.pe.encoder.tok.weight.grad is not None


@pytest.mark.parametrize("shifted", [False, True])
def test_pe_draws_made_ahead_give_the_pe_generator_forward(shifted: bool) -> None:
    """``pe_draws`` (SeqPE's regularizer positions drawn on the host before the forward, as the recipes do) give
    the forward that ``pe_generator`` gives from a generator in the same state, bit for bit: logits, auxiliary loss,
    logs, gradients; the generator is left in the same state."""
    model = make_model({"method": "seqpe", "hidden": 32}).train()
    ids = tokens(2, TABLE)
    g_in, g_ahead = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    outs, grads = [], []
    for pe in ({"pe_generator": g_in}, {"pe_draws": draws_of(model, g_ahead, shifted=shifted)}):
        torch.manual_seed(5)  # the dropout masks alike
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=False, pe_shifted=shifted, **pe)
        (out.loss + out.pe_aux_loss).backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.pe.parameters()])
    want, got = outs
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    assert torch.equal(got.pe_aux_loss, want.pe_aux_loss) and want.pe_aux_loss > 0
    assert got.pe_logs.keys() == want.pe_logs.keys() and ("pe_spread" in got.pe_logs) != shifted
    assert all(torch.equal(got.pe_logs[k], want.pe_logs[k]) for k in got.pe_logs)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(g_in.get_state(), g_ahead.get_state())
    with pytest.raises(ValueError, match="a generator or its draws, not both"):
        model(ids, use_cache=False, pe_generator=g_in, pe_draws=model.pe.draw(g_ahead))
    assert draws_of(model.eval(), g_ahead) is None  # nothing to draw in evaluation


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_decoding_step_transforms_only_its_new_keys(name: str) -> None:
    """The PE work of a step does not grow with the context: cached keys stay transformed (a PE that leaves
    keys as they are needs no store: the HF cache's keys serve)."""
    model = make_model(VARIANTS[name])
    if not model.pe.transforms_keys:
        with torch.no_grad():
            out = model(tokens(2, 8), use_cache=True)
        assert not hasattr(out.cache, "_seqpe_nd_transformed_keys")
        # seqpe: attn_bias with one W_PE adds its position scores as a bias (next test)
        assert name in ("nope", "ape_sin", "ape_learn", "alibi", "alibi_nd", "seqpe-input_add", "seqpe")
        return
    seen: list[int] = []
    transform = model.pe.transform_qk
    model.pe.transform_qk = lambda q, k, state, layer: seen.append(k.shape[-2]) or transform(q, k, state, layer)
    ids = tokens(2, 12)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        assert seen == [8] * LAYERS  # the prompt, once per layer
        seen.clear()
        for i in range(8, 12):
            out = model(ids[:, i : i + 1], cache=out.cache, use_cache=True)
        assert seen == [1] * (LAYERS * 4)  # one new key per layer and step, however long the context


def test_seqpe_decoding_adds_one_position_score_bias_for_all_layers() -> None:
    """attn_bias with one W_PE: a decoding step widens no key; Eq. 14's E^q_i · E^k_j is computed once a step
    (from the encoder's table, not per layer), and the logits equal the full forward's."""
    model = make_model(PE_CONFIGS["seqpe"])
    transformed: list[int] = []
    transform = model.pe.transform_qk
    model.pe.transform_qk = lambda q, k, state, layer: transformed.append(k.shape[-2]) or transform(q, k, state, layer)
    scored: list[tuple[int, ...]] = []
    scores = model.pe._position_scores
    model.pe._position_scores = lambda state, *a: scored.append(tuple(state.pos_k.shape)) or scores(state, *a)
    ids = tokens(2, 14)

    def prompt_then_steps(mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full forward's logits of tokens 10…13, and theirs decoded one at a time after a 10-token prompt."""
        pad = (lambda end: None) if mask is None else (lambda end: mask[:, :end])
        with torch.no_grad():
            full = model(ids, attention_mask=pad(14), use_cache=False).logits
            transformed.clear()
            scored.clear()
            out = model(ids[:, :10], attention_mask=pad(10), use_cache=True)
            steps = []
            for i in range(10, 14):
                out = model(ids[:, i : i + 1], attention_mask=pad(i + 1), cache=out.cache, use_cache=True)
                steps.append(out.logits)
        return full[:, 10:], torch.cat(steps, 1)

    want, got = prompt_then_steps(None)
    # the prompt's q and k widened, as in training; then no key widened, and one bias per step for all layers
    assert transformed == [10] * LAYERS and scored == [(2, m, 1) for m in range(11, 15)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Left padding: the rows' positions differ, so the keys' embeddings are looked up per row.
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    want, got = prompt_then_steps(mask)
    assert len(scored) == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rope", "seqpe", "alibi", "ape_learn"])
def test_a_cropped_or_reordered_cache_still_equals_the_full_forward(name: str) -> None:
    model = make_model(PE_CONFIGS[name])
    ids = tokens(2, 12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        out.cache.crop(-3)  # assisted decoding drops the rejected draft tokens
        again = model(ids[:, 6:9], cache=out.cache, use_cache=True).logits
        torch.testing.assert_close(again, full[:, 6:9], rtol=1e-4, atol=1e-4)
        swap = torch.tensor([1, 0])
        out.cache.reorder_cache(swap)  # beam search reorders the rows
        step = model(ids[swap, 9:10], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(step, full[swap, 9:10], rtol=1e-4, atol=1e-4)


def test_one_config_builds_models_with_different_pes_and_stays_the_callers() -> None:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=64, n_layer=1, n_head=2, n_embd=16, n_positions=32, bos_token_id=None,
                        eos_token_id=None)
    space = load_space({"L": 8, "L_max": 64})
    models = [GPT2WithPE(config, build_position_encoding({"method": m}, space=space, num_heads=2, head_dim=8,
                                                         num_layers=1, d_model=16)) for m in ("rope", "alibi")]
    assert [type(m.pe).__name__ for m in models] == ["RoPE", "ALiBi"]
    assert type(config) is GPT2Config and not hasattr(config, "position_encoding")  # untouched

"""SeqPE integrations against Eq. 12-14 written out with explicit score matrices."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import seqpe_nd.encodings.base as base_module
from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.seqpe import COLLAPSED_SPREAD, INTEGRATIONS, SeqPEEncoding
from seqpe_nd.positions import load_space

H, E, LAYERS = 2, 8, 3
D = H * E
TINY = {"hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0}


def space(extent: list[int]):
    return load_space(
        {
            "L": extent,
            "L_max": [e * 8 for e in extent],
            "contrastive": {"batch": 8, "num_candidates": 8, "local_window": [4] * len(extent)},
            "ood": {"num_starts": 8, "num_teachers": 4},
        }
    )


def build(extent: list[int], **cfg) -> SeqPEEncoding:
    pe = build_position_encoding(
        {"method": "seqpe", **TINY, **cfg}, space=space(extent), num_heads=H, head_dim=E, num_layers=LAYERS, d_model=D
    )
    assert isinstance(pe, SeqPEEncoding)
    return pe


def heads_of(e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """E W + b (Eq. 11 with the released bias), the PE split across heads: head h gets columns h·e … (h+1)·e."""
    proj = e @ weight.T + (0 if bias is None else bias)  # (b, n, h*e)
    return torch.stack([proj[..., h * E : (h + 1) * E] for h in range(H)], dim=1)  # (b, h, n, e)


def naive(scores: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(A / √e) v with A given (Eq. 3)."""
    n, m = scores.shape[-2:]
    if causal:
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).tril(m - n).logical_not(), float("-inf"))
    return torch.softmax(scores / math.sqrt(E), dim=-1) @ v


@pytest.mark.parametrize("integration", ["attn_sum", "attn_mul", "attn_bias"])
@pytest.mark.parametrize("extent", [[10], [3, 3], [2, 2, 2]])
@pytest.mark.parametrize("causal", [True, False])
def test_integrations_equal_their_equations(integration: str, extent: list[int], causal: bool) -> None:
    torch.manual_seed(0)
    pe = build(extent, integration=integration, per_layer=True).eval()
    layer = 1
    with torch.no_grad():  # a trained bias, not its zero init
        pe.w_pe[layer].bias.normal_(0.0, 0.5)
    sp = space(extent)
    pos = torch.stack([sp.positions(), sp.positions() + 2])  # rows differ
    n = pos.shape[1]
    q, k, v = (torch.randn(2, H, n, E) for _ in range(3))
    got = pe.attend(q, k, v, pe.prepare(pos), layer, causal=causal)

    emb = pe.encoder(pos)  # (b, n, d)
    w, b = pe.w_pe[layer].weight, pe.w_pe[layer].bias
    e_q, e_k = heads_of(emb, w[:D], b[:D]), heads_of(emb, w[D:], b[D:])
    scores = {
        "attn_sum": (q + e_q) @ (k + e_k).transpose(-1, -2),  # Eq. 12
        "attn_mul": (q * e_q) @ (k * e_k).transpose(-1, -2),  # Eq. 13
        "attn_bias": q @ k.transpose(-1, -2) + e_q @ e_k.transpose(-1, -2),  # Eq. 14
    }[integration]
    torch.testing.assert_close(got, naive(scores, v, causal), rtol=1e-5, atol=1e-5)


def test_attn_bias_runs_in_plain_sdpa_with_the_original_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concatenation keeps SDPA's is_causal path: no mask, no [n, m] bias, scale 1/√e not 1/√(2e)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, v.shape, kwargs))
        return real(q, k, v, **kwargs)

    pe = build([12], integration="attn_bias").eval()
    q = torch.randn(1, H, 12, E)
    state = pe.prepare(torch.arange(12)[None, :, None])  # the encoder's own attention runs here
    monkeypatch.setattr(base_module.F, "scaled_dot_product_attention", spy)
    pe.attend(q, q, q, state, 0, causal=True)
    ((q_shape, k_shape, v_shape, kwargs),) = calls
    assert q_shape[-1] == k_shape[-1] == v_shape[-1] == 2 * E  # v zero-padded: one head dim for fused kernels
    assert kwargs["attn_mask"] is None and kwargs["is_causal"] is True
    assert kwargs["scale"] == pytest.approx(1 / math.sqrt(E))


def test_input_add_embeds_the_encoder_output_and_leaves_attention_alone() -> None:
    torch.manual_seed(0)
    pe = build([3, 4], integration="input_add").eval()
    assert not hasattr(pe, "w_pe")
    pos = space([3, 4]).positions()[None]
    state = pe.prepare(pos)
    torch.testing.assert_close(pe.embed(state), pe.encoder(pos))
    q = torch.randn(1, H, 12, E)
    torch.testing.assert_close(pe.attend(q, q, q, state, 2, causal=False), F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("init", ["normal", "trunc_normal"])
def test_w_pe_has_the_released_bias_and_init(init: str) -> None:
    """As released: nn.Linear(d, 2·h·e, bias=True), weights N(0, 0.02) (the encoder's init), zero bias; not
    PyTorch's kaiming-uniform default (std 1/√(3d) ≈ 0.05 at d = 128)."""
    torch.manual_seed(0)
    d = 128
    pe = build_position_encoding({"method": "seqpe", **TINY, "init": init, "per_layer": True}, space=space([8]),
                                 num_heads=4, head_dim=32, num_layers=LAYERS, d_model=d)
    weights = torch.cat([lin.weight.flatten() for lin in pe.w_pe])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05) and weights.abs().max().item() < 0.2
    assert all(lin.bias is not None and lin.bias.shape == (2 * d,) and not lin.bias.any() for lin in pe.w_pe)
    off = build([8], w_pe_bias=False)
    assert all(lin.bias is None for lin in off.w_pe)


def test_w_pe_keeps_its_init_inside_every_backbone() -> None:
    """A backbone's own init (HF post_init, timm's) must not redo W_PE or the encoder."""
    from seqpe_nd.tasks.backbones.language_model import build_lm
    from seqpe_nd.tasks.recipes import load_config

    for config in ("configs/lm/smoke/seqpe.yaml", "configs/lm/smoke/llama/default.yaml"):
        cfg = load_config(Path(__file__).resolve().parents[2] / config)
        torch.manual_seed(0)
        model = build_lm(cfg.model, cfg.pe, cfg.space, vocab_size=64, eos_id=0)
        w_pe = model.get_submodule("pe.w_pe.0") if hasattr(model, "pe") else next(
            m for n, m in model.named_modules() if n.endswith("w_pe.0"))
        assert w_pe.weight.std().item() == pytest.approx(0.02, rel=0.05), config
        assert w_pe.bias is not None and not w_pe.bias.any(), config


def test_w_pe_shared_or_per_layer() -> None:
    torch.manual_seed(0)
    pos = torch.arange(6)[None, :, None]
    q = torch.randn(1, H, 6, E)
    shared, per_layer = build([6], per_layer=False).eval(), build([6], per_layer=True).eval()
    assert len(shared.w_pe) == 1 and len(per_layer.w_pe) == LAYERS
    s = shared.prepare(pos)
    torch.testing.assert_close(shared.attend(q, q, q, s, 0, causal=True), shared.attend(q, q, q, s, 2, causal=True))
    p = per_layer.prepare(pos)
    assert not torch.allclose(
        per_layer.attend(q, q, q, p, 0, causal=True), per_layer.attend(q, q, q, p, 2, causal=True)
    )
    with pytest.raises(ValueError, match="out of range"):
        shared.attend(q, q, q, s, LAYERS, causal=True)


def test_regularizer_loss_in_training_only_and_options_reach_it() -> None:
    pe = build([8], alpha=0.3, beta=0.2, ood_heads=4, symmetric_kl=True, ood_reduction="batchmean")
    reg = pe.regularizer
    assert reg is not None
    assert (reg.alpha, reg.beta, reg.ood_heads, reg.symmetric_kl, reg.ood_reduction) == (0.3, 0.2, 4, True, "batchmean")
    assert build([8]).regularizer.ood_reduction == "mean"  # β means the paper's β by default
    pos = torch.arange(8)[None, :, None]
    state = pe.train().prepare(pos, generator=torch.Generator().manual_seed(1))
    assert state.aux_loss is not None and state.aux_loss.requires_grad and state.logs["loss_ood"] > 0
    again = pe.prepare(pos, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.aux_loss, state.aux_loss)  # the generator drives the samplers
    shifted = pe.prepare(pos + 5, generator=torch.Generator().manual_seed(1), shifted=True)
    assert shifted.logs["loss_ood"] == 0.0  # L_OOD only on unshifted steps
    assert pe.eval().prepare(pos).aux_loss is None
    assert build([8], alpha=0.0, beta=0.0).regularizer is None
    assert build([8]).regularizer.ood_heads == H  # default: the model's heads


def test_encoder_options_reach_the_encoder() -> None:
    cfg = {
        "hidden": 24,
        "layers": 3,
        "heads": 3,
        "mlp_ratio": 2.0,
        "dropout": 0.2,
        "causal": False,
        "init": "trunc_normal",
    }
    pe = build_position_encoding(
        {"method": "seqpe", **cfg}, space=space([4]), num_heads=H, head_dim=E, num_layers=1, d_model=D
    )
    assert isinstance(pe, SeqPEEncoding)
    assert {k: pe.encoder.config[k] for k in cfg} == cfg
    assert pe.encoder.d_model == D


def test_cached_keys_use_their_own_positions() -> None:
    """k holds only the last keys of pos_k: their PE comes from the END of e_k."""
    torch.manual_seed(0)
    pe = build([10], integration="attn_sum").eval()
    pos = torch.arange(10)[None, :, None]
    q, k = torch.randn(1, H, 10, E), torch.randn(1, H, 10, E)
    _, full_k = pe.transform_qk(q, k, pe.prepare(pos), 0)
    _, tail_k = pe.transform_qk(q[:, :, -1:], k[:, :, -3:], pe.prepare(pos[:, -1:], pos), 0)
    torch.testing.assert_close(tail_k, full_k[:, :, -3:])


def test_pe_cos_is_the_mean_pairwise_cosine_of_distinct_main_positions() -> None:
    """Collapse signal, held against a loop: cos over every pair of distinct positions (≤ 64 of them)."""
    from seqpe_nd.encodings.seqpe import mean_pairwise_cosine

    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 3, 3, 7, 1, 0])[None, :, None].expand(2, -1, -1)  # 4 distinct positions, repeated
    emb = {p: torch.randn(5, generator=g) for p in (0, 1, 3, 7)}
    e = torch.stack([torch.stack([emb[int(p)] for p in row[:, 0]]) for row in pos])
    keys = sorted(emb)
    pairs = [(a, b) for a in keys for b in keys if a != b]
    expected = sum(float(F.cosine_similarity(emb[a], emb[b], dim=0)) for a, b in pairs) / len(pairs)
    assert float(mean_pairwise_cosine(pos, e)) == pytest.approx(expected, rel=1e-5)
    same = torch.ones(1, 6, 5)  # a collapsed encoder: every position the same direction
    assert float(mean_pairwise_cosine(torch.arange(6)[None, :, None], same)) == pytest.approx(1.0)
    many = torch.arange(300)[None, :, None]
    assert float(mean_pairwise_cosine(many, torch.randn(1, 300, 8, generator=g))) < 0.5  # subsampled to 64 rows

    pe = build([8]).train()
    state = pe.prepare(torch.arange(8)[None, :, None], generator=torch.Generator().manual_seed(1))
    assert set(state.logs) == {"loss_delta", "loss_ood", "loss_reg", "pe_cos", "pe_spread"}
    assert all(isinstance(v, torch.Tensor) and v.shape == () for v in state.logs.values())
    # Off (the trainer's steps that write no logs): no pe_cos/pe_spread, and not the clean encoder pass they cost.
    pe.diagnostics = False
    calls = []
    encode_unique = pe.encoder.encode_unique
    pe.encoder.encode_unique = lambda p: calls.append(p) or encode_unique(p)  # type: ignore[method-assign]
    state = pe.prepare(torch.arange(8)[None, :, None], generator=torch.Generator().manual_seed(1))
    assert set(state.logs) == {"loss_delta", "loss_ood", "loss_reg"} and len(calls) == 1  # the regularized call only


def test_pe_cos_is_measured_without_dropout() -> None:
    """With encoder dropout, the logged pe_cos is the cosine of the clean (eval-mode) embeddings."""
    from seqpe_nd.encodings.seqpe import mean_pairwise_cosine

    space = load_space({"kind": "grid", "L": 16, "L_max": 100})
    torch.manual_seed(0)
    pe = build_position_encoding(
        {"method": "seqpe", "hidden": 16, "layers": 1, "dropout": 0.5, "alpha": 0.0, "beta": 0.0},
        space=space, num_heads=2, head_dim=4, num_layers=1, d_model=8,
    ).train()
    pos = torch.arange(16).view(1, 16, 1)
    logged = float(pe.prepare(pos, generator=torch.Generator().manual_seed(0)).logs["pe_cos"])
    assert pe.encoder.training  # the clean probe put the encoder back into training mode
    pe.encoder.eval()
    with torch.no_grad():
        want = float(mean_pairwise_cosine(pos, pe.encoder.encode_unique(pos[0]).unsqueeze(0)))
    assert logged == pytest.approx(want, rel=1e-5)


def collapse_logs(pe: SeqPEEncoding, n: int = 16) -> dict[str, float]:
    """pe_cos and pe_spread of one training forward over positions 0 … n-1."""
    logs = pe.train().prepare(torch.arange(n)[None, :, None], generator=torch.Generator().manual_seed(0)).logs
    return {k: float(logs[k]) for k in ("pe_cos", "pe_spread")}


@pytest.mark.parametrize("integration", INTEGRATIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pe_spread_is_zero_when_every_position_gets_the_same_embedding(integration: str, dropout: float) -> None:
    """A collapsed encoder (output weight zeroed: every position gets the output bias) reads pe_spread 0, pe_cos 1."""
    torch.manual_seed(0)
    pe = build([16], integration=integration, dropout=dropout)
    with torch.no_grad():
        pe.encoder.proj.weight.zero_()
        pe.encoder.proj.bias.normal_()
    logs = collapse_logs(pe)
    assert logs["pe_cos"] == pytest.approx(1.0, abs=1e-6)
    assert logs["pe_spread"] < 1e-6


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_pe_spread_sees_position_under_a_large_shared_mean(integration: str) -> None:
    """The case pe_cos misreads: position-dependent embeddings plus one big vector shared by every position.
    pe_cos reads > 0.99 (collapsed, by its old reading) while pe_spread stays far above COLLAPSED_SPREAD."""
    torch.manual_seed(0)
    pe = build([16], integration=integration)
    with torch.no_grad():
        pe.encoder.proj.weight.normal_()  # embeddings that clearly depend on position ...
        pe.encoder.proj.bias.sub_(pe.encoder(torch.arange(16)[:, None]).mean(dim=0))  # ... and share no mean
        if integration != "input_add":
            pe.w_pe[0].weight.normal_(std=2.0)  # W_PE large enough for position to steer attention
    healthy = collapse_logs(pe)
    with torch.no_grad():
        pe.encoder.proj.bias.add_(100.0 * torch.randn(D))  # the shared mean
    shared = collapse_logs(pe)
    assert healthy["pe_cos"] < 0.9 and shared["pe_cos"] > 0.99
    assert healthy["pe_spread"] > 10 * COLLAPSED_SPREAD and shared["pe_spread"] > 10 * COLLAPSED_SPREAD
    if integration == "input_add":  # the position-dependent part is what it measures: the mean drops out
        assert shared["pe_spread"] == pytest.approx(healthy["pe_spread"], rel=1e-4)


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_pe_spread_matches_loops(integration: str) -> None:
    """pe_spread written out: s_ij = E^q_i · E^k_j / √e through layer 0's W_PE (its bias included), the std over
    keys j, averaged over heads and queries; input_add: the RMS over positions of ‖e_i − mean e‖."""
    torch.manual_seed(0)
    pe = build([16], integration=integration, per_layer=True)
    k = 5
    emb = torch.randn(k, D)
    if integration == "input_add":
        e = emb.double().tolist()
        mean = [sum(row[c] for row in e) / k for c in range(D)]
        expected = math.sqrt(sum(sum((row[c] - mean[c]) ** 2 for c in range(D)) for row in e) / k)
    else:
        pe.w_pe[0] = torch.nn.Linear(D, 2 * H * E, bias=True)  # a bias must count
        with torch.no_grad():
            pe.w_pe[0].bias.normal_()
        proj = (emb.double() @ pe.w_pe[0].weight.double().T + pe.w_pe[0].bias.double()).tolist()  # (k, 2·h·e)
        stds = []
        for h in range(H):
            for i in range(k):
                scores = [
                    sum(proj[i][h * E + c] * proj[j][H * E + h * E + c] for c in range(E)) / math.sqrt(E)
                    for j in range(k)
                ]
                mean_s = sum(scores) / k
                stds.append(math.sqrt(sum((s - mean_s) ** 2 for s in scores) / k))
        expected = sum(stds) / len(stds)
    got = pe.position_spread(emb)
    assert got.shape == () and float(got) == pytest.approx(expected, rel=1e-4)
    # the logged value is this on the step's distinct positions (here the embeddings themselves, no dropout)
    pos = torch.arange(16)[None, :, None]
    logs = pe.train().prepare(pos, generator=torch.Generator().manual_seed(0)).logs
    with torch.no_grad():
        want = float(pe.position_spread(pe.encoder(pos)[0]))
    assert float(logs["pe_spread"]) == pytest.approx(want, rel=1e-5)


def test_static_shape_picks_score_the_distinct_positions_they_keep() -> None:
    """The compiled collapse signals' rows (``spaced_rows``): where no position repeats, the rows of
    ``distinct_rows``; with repeats, the statistics over the kept rows equal the plain ones over those rows."""
    from seqpe_nd.encodings.seqpe import (
        _mean_cosine, distinct_rows, embedding_spread, position_score_spread, spaced_rows,
    )

    g = torch.Generator().manual_seed(0)
    pos = torch.randperm(200, generator=g)[:90].view(1, 90, 1)  # distinct, unsorted
    rows, keep = spaced_rows(pos)
    assert keep.all() and torch.equal(rows, distinct_rows(pos))
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij"), -1).view(1, 35, 2)
    rows, keep = spaced_rows(grid.flip(1))  # 2-D: lexicographic order
    assert keep.all() and torch.equal(rows, distinct_rows(grid.flip(1)))

    dup = torch.randint(0, 40, (3, 50, 1), generator=g)  # repeats within and across rows
    rows, keep = spaced_rows(dup)
    kept = dup.view(-1, 1)[rows][keep]
    assert len(rows) == 64 and 1 < len(kept) < 64 and len(kept.unique(dim=0)) == len(kept)
    emb = torch.randn(len(rows), 8, generator=g)
    torch.testing.assert_close(_mean_cosine(emb, keep), _mean_cosine(emb[keep]))
    torch.testing.assert_close(embedding_spread(emb, keep), embedding_spread(emb[keep]))
    e_q, e_k = torch.randn(2, len(rows), 4, generator=g), torch.randn(2, len(rows), 4, generator=g)
    torch.testing.assert_close(position_score_spread(e_q, e_k, keep), position_score_spread(e_q[:, keep], e_k[:, keep]))
    one = torch.zeros(len(rows), dtype=torch.bool)
    one[0] = True
    assert _mean_cosine(emb, one).item() == 1.0  # fewer than two positions

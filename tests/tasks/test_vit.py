"""The timm ViT adapter: equal to timm where it must be, every method at any size, 3-D tubelets."""

from functools import partial

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from seqpe_nd.encodings import build_position_encoding, draws_of
from seqpe_nd.positions import load_space
from seqpe_nd.encodings import PrefixedEncoding
from seqpe_nd.tasks.backbones.vit import PEAttention, TubeletEmbed, ViTWithPE, create_vit

D, HEADS, DEPTH, PATCH, IMG, CLASSES = 32, 2, 2, 8, 32, 5
SPACE_2D = {
    "kind": "grid",
    "L": [4, 4],
    "L_max": [28, 28],  # 7x per axis; small enough for 4 pivots a step (Appendix A.4: 16 * 784 / 10^4 -> 2)
    "contrastive": {"batch": 4, "num_candidates": 8},
    "ood": {"num_starts": 2, "num_teachers": 4},
}
SEQPE = {"method": "seqpe", "hidden": 32, "layers": 1, "heads": 2, "dropout": 0.0, "init": "trunc_normal"}
METHODS = {
    "nope": {"method": "nope"},
    "ape_sin": {"method": "ape_sin"},
    "ape_learn": {"method": "ape_learn"},
    "rope_axial": {"method": "rope_axial"},
    "rope_mixed": {"method": "rope_mixed"},
    "alibi_nd": {"method": "alibi_nd"},
    "seqpe_attn_mul": {**SEQPE, "integration": "attn_mul", "per_layer": True},
    "seqpe_attn_sum": {**SEQPE, "integration": "attn_sum"},
    "seqpe_attn_bias": {**SEQPE, "integration": "attn_bias"},
    "seqpe_input_add": {**SEQPE, "integration": "input_add"},
}


def reference_vit(**kw: object) -> VisionTransformer:
    """Stock timm ViT with its own learned pos_embed (class token row included, the timm default)."""
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=CLASSES,
        dynamic_img_size=True,
        **kw,
    ).eval()


def ours(pe_config: dict, space: dict = SPACE_2D) -> ViTWithPE:
    torch.manual_seed(1)
    vit = create_vit(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    pe = build_position_encoding(
        pe_config, space=load_space(space), num_heads=HEADS, head_dim=D // HEADS, num_layers=DEPTH, d_model=D
    )
    return ViTWithPE(vit, pe)


def copy_timm_weights(model: ViTWithPE, ref: VisionTransformer) -> None:
    missing = model.vit.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "pos_embed"}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        model.prefix_pos.copy_(ref.pos_embed[:, :1])  # timm's [CLS] row is our prefix embedding


SHAPES = [(2, 3, 32, 32), (2, 3, 48, 48), (2, 3, 32, 56)]


@torch.no_grad()
def test_nope_reproduces_timm_forward_exactly() -> None:
    ref = reference_vit()
    ref.pos_embed.zero_()
    model = ours(METHODS["nope"]).eval()
    copy_timm_weights(model, ref)
    for shape in SHAPES:
        x = torch.randn(shape)
        torch.testing.assert_close(model(x).logits, ref(x), rtol=0, atol=0)


@torch.no_grad()
def test_ape_learn_reproduces_timm_learned_pos_embed() -> None:
    ref = reference_vit()
    model = ours({"method": "ape_learn", "resize": "exact"}).eval()
    copy_timm_weights(model, ref)
    g = IMG // PATCH
    model.pe.inner.table.copy_(ref.pos_embed[0, 1:].reshape(g, g, D))
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(model(x).logits, ref(x), rtol=0, atol=0)  # the training resolution: exact
    for shape in SHAPES[1:]:  # larger and rectangular grids: both resample bicubically (antialias, align_corners=False)
        x = torch.randn(shape)
        torch.testing.assert_close(model(x).logits, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resize", ["exact", "grow"])
def test_compiled_ape_learn_resamples_to_the_grid_of_the_input(resize: str) -> None:
    """Compiled, the table is resampled to the grid the input's shape gives (no value read): eager's result."""
    model = ours({"method": "ape_learn", "resize": resize}).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for shape in SHAPES:  # the training grid, larger and rectangular ones
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)


def test_compiled_ape_learn_refuses_positions_it_would_have_to_read() -> None:
    """Positions of unknown extent (offsets) compile to the table as it is, checked on the device: inside, eager's
    result; past it, an error (eager would resample to their extent, a shape that depends on values)."""
    model = ours({"method": "ape_learn"}).eval()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        zero = torch.zeros(2, 2, dtype=torch.long)
        torch.testing.assert_close(compiled(x, pos_offset=zero).logits, model(x, pos_offset=zero).logits)
        with pytest.raises(RuntimeError, match="ape_learn compiled reads its table unresampled"):
            compiled(x, pos_offset=torch.ones(2, 2, dtype=torch.long))


def test_ape_resampling_equals_timm_helper() -> None:
    table = torch.randn(4, 4, D)
    model = ours({"method": "ape_learn", "resize": "exact"}).eval()
    with torch.no_grad():
        model.pe.inner.table.copy_(table)
    state = model.prepare_state((7, 5))
    got = model.pe.embed(state)[0, 1:]  # patch tokens, row-major
    want = resample_abs_pos_embed(table.reshape(1, 16, D), new_size=(7, 5), old_size=(4, 4), num_prefix_tokens=0)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("integration", ["attn_bias", "input_add"])
def test_pe_draws_made_ahead_give_the_pe_generator_forward(integration: str) -> None:
    """Through the [CLS]-prefixed encoding: ``pe_draws`` (drawn before the forward) give the ``pe_generator``
    forward bit for bit, logits, auxiliary loss, logs and gradients, with per-image position offsets too."""
    model = ours({**SEQPE, "integration": integration, "dropout": 0.1}).train()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    offset = torch.tensor([[0, 3], [5, 1]])
    g_in, g_ahead = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    outs, grads = [], []
    for pe in ({"pe_generator": g_in}, {"pe_draws": draws_of(model, g_ahead)}):
        torch.manual_seed(5)
        model.zero_grad()
        out = model(x, pos_offset=offset, **pe)
        (out.logits.square().mean() + out.pe_aux_loss).backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.pe.parameters()])
    want, got = outs
    assert torch.equal(got.logits, want.logits) and torch.equal(got.pe_aux_loss, want.pe_aux_loss)
    assert got.pe_logs.keys() == want.pe_logs.keys() and "pe_spread" in got.pe_logs
    assert all(torch.equal(got.pe_logs[k], want.pe_logs[k]) for k in got.pe_logs)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(g_in.get_state(), g_ahead.get_state())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_at_two_resolutions_and_rectangular(name: str) -> None:
    model = ours(METHODS[name])
    model.train()
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x, pe_generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (2, CLASSES) and torch.isfinite(out.logits).all()
    loss = out.logits.square().mean() + (out.pe_aux_loss if out.pe_aux_loss is not None else 0)
    loss.backward()
    assert (out.pe_aux_loss is not None) == name.startswith("seqpe")
    model.eval()
    with torch.no_grad():
        for shape in SHAPES[1:]:
            logits = model(torch.randn(shape)).logits
            assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()


@torch.no_grad()
def test_positions_come_from_the_input_size() -> None:
    model = ours(METHODS["rope_axial"]).eval()
    seen = []
    real = model.pe.prepare
    spy = lambda pos, *a, **k: (seen.append(pos.clone()), real(pos, *a, **k))[1]  # noqa: E731
    model.pe.prepare = spy  # type: ignore[method-assign]
    model(torch.randn(1, 3, 24, 40))
    pos = seen[0][0]
    assert pos.shape == (3 * 5, 2)
    assert pos[:6].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 0]]  # row-major, as timm flattens
    model(torch.randn(1, 3, 16, 16), pos_offset=torch.tensor([10, 20]))
    assert seen[1][0].tolist() == [[10, 20], [10, 21], [11, 20], [11, 21]]


@torch.no_grad()
def test_prefix_token_has_no_position_inside_attention() -> None:
    model = ours(METHODS["alibi_nd"]).eval()
    state = model.prepare_state((3, 3))
    mod = model.pe.score_mod(state, 0)
    t = 1 + 9
    qi, ki = torch.arange(t).view(t, 1), torch.arange(t).view(1, t)
    bias = mod(torch.zeros(()), torch.zeros(()).long(), torch.zeros(()).long(), qi, ki)
    assert (bias[0] == 0).all() and (bias[:, 0] == 0).all()
    assert bias[1, 2] < 0 and bias[1, 1] == 0  # patch (0,0) to (0,1): ALiBi's distance penalty
    # attn_bias widens q/k: the prefix is zero-padded, so its PE score contribution is exactly zero.
    model = ours(METHODS["seqpe_attn_bias"]).eval()
    state = model.prepare_state((2, 2))
    q, k = torch.randn(1, HEADS, 5, D // HEADS), torch.randn(1, HEADS, 5, D // HEADS)
    q2, k2 = model.pe.transform_qk(q, k, state, 0)
    assert q2.shape[-1] == 2 * (D // HEADS)
    torch.testing.assert_close(q2[:, :, :1] @ k2.transpose(-1, -2), q[:, :, :1] @ k.transpose(-1, -2))


def test_video_tubelet_model_runs_on_a_3d_space() -> None:
    space = {
        "kind": "grid",
        "L": [2, 4, 4],
        "L_max": [4, 16, 16],
        "contrastive": {"batch": 4, "num_candidates": 8, "local_window": [2, 5, 5]},
        "ood": {"num_starts": 2, "num_teachers": 4},
    }
    embed = partial(TubeletEmbed, num_frames=4, tubelet=2)
    for cfg in (METHODS["rope_axial"], {**SEQPE, "integration": "attn_mul", "per_layer": True}, METHODS["ape_learn"]):
        torch.manual_seed(0)
        vit = create_vit(
            img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=3, embed_layer=embed
        )
        pe = build_position_encoding(cfg, space=load_space(space), num_heads=2, head_dim=24, num_layers=2, d_model=48)
        model = ViTWithPE(vit, pe)
        out = model(torch.randn(2, 3, 4, 16, 16), pe_generator=torch.Generator().manual_seed(0))  # (b, c, T, H, W)
        assert out.logits.shape == (2, 3)
        out.logits.sum().backward()
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 6, 24, 16)).logits.shape == (1, 3)  # 3 x 6 x 4 tubelets
        assert model.grid_shape((1, 3, 6, 24, 16)) == (3, 6, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dynamic_img_size": True, "attn_layer": PEAttention}, "pos_embed='none'"),
        ({"dynamic_img_size": True, "pos_embed": "none"}, "attn_layer=PEAttention"),
        ({"pos_embed": "none", "attn_layer": PEAttention}, "dynamic_img_size=True"),
    ],
)
def test_adapter_refuses_a_timm_model_not_prepared_for_it(kwargs: dict, message: str) -> None:
    sizes = dict(num_heads=HEADS, head_dim=D // HEADS, num_layers=DEPTH, d_model=D)
    pe = build_position_encoding({"method": "nope"}, space=load_space(SPACE_2D), **sizes)
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, **kwargs)
    with pytest.raises(ValueError, match=message):
        ViTWithPE(vit, pe)


def test_timm_named_model_is_wrapped_not_copied() -> None:
    vit = create_vit("vit_tiny_patch16_224", num_classes=10)  # a registered timm name (ViT-S/16 in the paper configs)
    assert type(vit) is VisionTransformer and all(type(b.attn) is PEAttention for b in vit.blocks)
    assert vit.pos_embed is None and vit.dynamic_img_size
    assert isinstance(PrefixedEncoding, type)


def test_create_vit_with_a_name_honours_the_shape_it_is_given() -> None:
    vit = create_vit("vit_small_patch16_224", img_size=64, depth=2, embed_dim=48, num_heads=3, num_classes=5)
    assert len(vit.blocks) == 2 and vit.embed_dim == 48 and vit.blocks[0].attn.num_heads == 3
    assert vit.patch_embed.patch_size == (16, 16) and vit.num_classes == 5  # the rest stays the named model's

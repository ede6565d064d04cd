"""A user's own timm ViT: attach any 2-D position encoding in place, run it at other sizes, save and load it exact."""

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.attach import attach_position_encoding, load_vit, pe_sizes, save_vit
from seqpe_nd.tasks.backbones.timm_vit import VisionTransformerWithPE, from_wrapper
from seqpe_nd.tasks.backbones.vit import PEAttention, ViTWithPE, create_vit

from .test_vit import METHODS, SPACE_2D

IMG = 32
SHAPES = [(2, 3, IMG, IMG), (2, 3, 2 * IMG, 2 * IMG), (2, 3, IMG, 48)]  # the model's size, 2x, rectangular


def user_vit(seed: int = 0) -> VisionTransformer:
    """What a user has: a registered timm ViT, made small (the shape arguments override the named model's)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", img_size=IMG, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=5)


def attached(name: str, seed: int = 0) -> VisionTransformerWithPE:
    model = user_vit(seed)
    torch.manual_seed(seed + 1)
    pe = build_position_encoding(METHODS[name], space=load_space(SPACE_2D), **pe_sizes(model))
    return attach_position_encoding(model, pe)


@torch.no_grad()
def test_nope_attached_is_timm_without_patch_positions() -> None:
    # Independent reference: timm's own forward, its pos_embed zeroed on the patch rows (the [CLS] row is kept by attach).
    stock = user_vit().eval()
    with torch.no_grad():
        stock.pos_embed[:, 1:].zero_()
    model = attached("nope").eval()
    x = torch.randn(SHAPES[0])
    torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(METHODS))
@torch.no_grad()
def test_attached_equals_the_recipe_wrapper_on_the_same_weights_at_every_size(name: str) -> None:
    """The in-place attach computes exactly what ViTWithPE (the recipes' adapter, tested against timm) computes."""
    model = attached(name).eval()
    assert isinstance(model, VisionTransformer) and all(type(b.attn) is PEAttention for b in model.blocks)
    torch.manual_seed(5)
    wrapper = ViTWithPE(
        create_vit(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5),
        build_position_encoding(METHODS[name], space=load_space(SPACE_2D), **pe_sizes(model)),
    ).eval()
    state = model.state_dict()
    wrapper.load_state_dict({("" if k.startswith(("pe.", "prefix_pos")) else "vit.") + k: v for k, v in state.items()})
    for shape in SHAPES:
        x = torch.randn(shape)
        out = model(x)
        assert type(out) is torch.Tensor and out.shape == (shape[0], 5)  # timm's tensor, not a wrapper output
        torch.testing.assert_close(out, wrapper(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), out, rtol=0, atol=0)


def test_attach_keeps_the_users_weights_and_its_cls_position() -> None:
    model = user_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_position_encoding(model, build_position_encoding(METHODS["seqpe_attn_mul"], space=load_space(SPACE_2D),
                                                            **pe_sizes(model)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "pos_embed")
    assert "pos_embed" not in after and model.pos_embed is None
    assert torch.equal(after["prefix_pos"], before["pos_embed"][:, :1])


def test_seqpe_aux_loss_reaches_the_users_loop_and_trains_the_encoder() -> None:
    model = attached("seqpe_attn_mul").train()
    x, y = torch.randn(SHAPES[0]), torch.tensor([0, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y) + model.pe_aux_loss
    assert model.pe_aux_loss.ndim == 0 and float(model.pe_aux_loss.detach()) > 0
    assert {"loss_delta", "loss_ood"} <= set(model.pe_logs)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("pe.") and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        model(x)
    assert float(model.pe_aux_loss) == 0.0  # no regularizer work in eval mode


@pytest.mark.parametrize("name", ["ape_learn", "rope_mixed", "alibi_nd", "seqpe_attn_mul", "seqpe_input_add"])
def test_save_and_load_give_the_same_model(name: str, tmp_path: Path) -> None:
    model = attached(name, seed=3)
    with torch.no_grad():  # trained-looking weights, not the init a fresh build would repeat
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    save_vit(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224" and config["vit"]["depth"] == 2
    assert config["position_encoding"]["config"]["method"] == METHODS[name]["method"]
    back = load_vit(tmp_path / "saved")
    assert isinstance(back, VisionTransformerWithPE) and not back.training
    with torch.no_grad():
        for shape in SHAPES:
            x = torch.randn(shape)
            torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_a_recipe_model_exports_to_the_same_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wrapper = ViTWithPE.with_pe(create_vit(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           num_classes=5), METHODS["rope_axial"], load_space(SPACE_2D)).eval()
    x = torch.randn(SHAPES[1])
    with torch.no_grad():
        want = wrapper(x).logits
    save_vit(from_wrapper(wrapper), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(load_vit(tmp_path / "out")(x), want, rtol=0, atol=0)


def test_mistakes_are_one_clear_error_before_the_model_changes(tmp_path: Path) -> None:
    model = user_vit()
    nope = build_position_encoding({"method": "nope"}, space=load_space(SPACE_2D), **pe_sizes(model))
    with pytest.raises(ValueError, match="supports Hugging Face causal LMs.*timm's VisionTransformer.*got Linear"):
        attach_position_encoding(torch.nn.Linear(2, 2), nope)
    wrong = build_position_encoding({"method": "nope"}, space=load_space(SPACE_2D), num_heads=4, head_dim=8,
                                    num_layers=2, d_model=32)
    with pytest.raises(ValueError, match=r"PE sized for 2 layers x 4 heads x 8 dims, the ViT has 2 x 2 x 16"):
        attach_position_encoding(model, wrong)
    one_d = build_position_encoding({"method": "nope"}, space=load_space({"kind": "grid", "L": [16], "L_max": [64]}),
                                    **pe_sizes(model))
    with pytest.raises(ValueError, match="2-D positions"):
        attach_position_encoding(model, one_d)
    assert type(model) is VisionTransformer and model.pos_embed is not None  # untouched by the refusals
    attach_position_encoding(model, nope)
    with pytest.raises(ValueError, match="already has a position encoding"):
        attach_position_encoding(model, nope)
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "other"}))
        (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
        load_vit(tmp_path / "bad")

"""Save a model with a position encoding and load it back exactly: Hugging Face GPT-2 and timm ViT.

Shows: a GPT-2 with SeqPE saves with `save_pretrained` (its config.json records the PE's config and
position space) and comes back from `AutoModelForCausalLM.from_pretrained` once `seqpe_nd.tasks.attach`
is imported (that import registers the PE model classes); a timm ViT with a PE saves with `save_vit`
and loads with `load_vit`. Both give bit-identical outputs.

Run:  python examples/save_and_reload.py [--out DIR]   (default: a temporary folder, removed afterwards)
"""

import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, load_vit, pe_sizes, save_vit  # registers the Auto classes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, help="where to save the two models (kept); default a temporary folder")
args = parser.parse_args()
torch.manual_seed(0)
SMALL_REGULARIZERS = {"contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}


def perturb(model: torch.nn.Module) -> None:
    """Stand-in for training: weights no fresh build would repeat, so a load that re-initialised anything shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


def save_and_reload(out: Path) -> None:
    # GPT-2 (a real user: GPT2LMHeadModel.from_pretrained("gpt2")) with SeqPE.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                      bos_token_id=None, eos_token_id=None))
    space = {"kind": "grid", "L": [32], "L_max": [1000], **SMALL_REGULARIZERS}
    attach_position_encoding(gpt2, build_position_encoding({"method": "seqpe", "layers": 1}, space=space,
                                                           **pe_sizes(gpt2)))
    perturb(gpt2)
    gpt2.save_pretrained(out / "gpt2")
    saved = json.loads((out / "gpt2" / "config.json").read_text())
    print(f"gpt2: saved to {out / 'gpt2'}: model_type {saved['model_type']}, "
          f"PE {saved['position_encoding']['config']['method']}")
    loaded = AutoModelForCausalLM.from_pretrained(out / "gpt2")  # the PE is rebuilt from config.json
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        same = torch.equal(gpt2.eval()(ids).logits, loaded.eval()(ids).logits)
    print(f"gpt2: reloaded as {type(loaded).__name__}, logits equal: {same}")
    assert same, "the reloaded GPT-2 gives other logits"

    # timm ViT (a real user: timm.create_model("vit_small_patch16_224", pretrained=True)) with SeqPE (any PE saves).
    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                            num_classes=4)
    space = {"kind": "grid", "L": [4, 4], "L_max": [28, 28], **SMALL_REGULARIZERS}
    attach_position_encoding(vit, build_position_encoding({"method": "seqpe", "integration": "attn_mul", "layers": 1},
                                                          space=space, **pe_sizes(vit)))
    perturb(vit)
    save_vit(vit, out / "vit")
    print(f"vit: saved to {out / 'vit'}: {sorted(p.name for p in (out / 'vit').iterdir())}")
    back = load_vit(out / "vit")  # comes back in eval mode
    for px in (32, 64):
        x = torch.randn(2, 3, px, px)
        with torch.no_grad():
            same = torch.equal(vit.eval()(x), back(x))
        print(f"vit: reloaded as {type(back).__name__}, outputs at {px} px equal: {same}")
        assert same, f"the reloaded ViT gives other outputs at {px} px"


if args.out is not None:
    save_and_reload(args.out)
else:
    with tempfile.TemporaryDirectory() as tmp:
        save_and_reload(Path(tmp))
print("OK")

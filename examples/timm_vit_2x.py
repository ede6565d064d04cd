"""A 2-D position encoding in your own timm ViT: train at 32 px, evaluate at 64 px (4x the patches).

Shows: `attach_position_encoding` turns a `timm.create_model("vit_...")` instance into one whose
positions come from a 2-D PE (SeqPE multiplying q and k, `integration: attn_mul`, or RoPE-Mixed);
its forward still returns timm's logits tensor, and `model.pe_aux_loss` holds SeqPE's regularizer
loss after each call, to add to yours. Positions follow each input's size, so the same weights run at
2x the training resolution without resampling a position table.

Run:  python examples/timm_vit_2x.py [--steps 5] [--method seqpe|rope_mixed]
"""

import argparse

import timm
import torch
import torch.nn.functional as F

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, param_groups, pe_sizes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5, help="training steps on random images")
parser.add_argument("--method", choices=["seqpe", "rope_mixed"], default="seqpe")
args = parser.parse_args()
torch.manual_seed(0)

# Your model: a registered timm ViT. A real user would take it as is, e.g.
# timm.create_model("vit_small_patch16_224", pretrained=True); the shape arguments here make it tiny.
model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                          num_classes=4)

# The position space: a 4 x 4 patch grid (32 px / 8 px patches); SeqPE's regularizers reach 28 x 28.
space = {"kind": "grid", "L": [4, 4], "L_max": [28, 28],
         "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 4}}
if args.method == "seqpe":  # SeqPE's embeddings multiply q and k (Eq. 13); a 1-layer encoder keeps it quick
    pe_config = {"method": "seqpe", "integration": "attn_mul", "layers": 1}
else:  # RoPE-Mixed (Heo et al.): learned per-head frequencies over both axes
    pe_config = {"method": "rope_mixed"}
model = attach_position_encoding(model, build_position_encoding(pe_config, space=space, **pe_sizes(model)))
# model.pe wraps the PE so that the [CLS] token keeps its own learned embedding (timm's pos_embed row 0).
print(f"{type(model).__name__} with {type(model.pe.inner).__name__} ({pe_config})")

optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))  # random images and labels stand in for your data
model.train()
losses = []
for step in range(args.steps):
    logits = model(x)  # timm's (batch, classes) tensor
    loss = F.cross_entropy(logits, y) + model.pe_aux_loss  # pe_aux_loss: SeqPE's alpha*L_delta + beta*L_OOD, else 0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.3f} (pe_aux_loss {model.pe_aux_loss.item():.4f})")
    losses.append(loss.item())
assert losses[-1] < losses[0], "the loss should fall on a batch seen again and again"

model.eval()
with torch.no_grad():
    for px in (32, 64):  # the training size, then 2x per side: an 8 x 8 patch grid the model never saw
        images = torch.randn(2, 3, px, px)
        out = model(images)
        print(f"eval at {px} px: {(px // 8) ** 2} patches -> logits {tuple(out.shape)}, "
              f"pe_aux_loss {model.pe_aux_loss.item()} (none in eval mode)")
        assert type(out) is torch.Tensor and out.shape == (2, 4) and bool(out.isfinite().all())
        assert float(model.pe_aux_loss) == 0.0
print("OK")

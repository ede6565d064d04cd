"""A 3-D position space (video: frames x rows x columns) declared in YAML, and SeqPE built for it.

Shows: a position space is data, not code: `load_space` reads the YAML; SeqPE turns every position's
digits into an embedding with one encoder for any number of axes, so positions of a grid larger than
the training one (more frames, bigger frames) go through the same `prepare` / `attend` calls. In
training, `prepare` also returns SeqPE's regularizer loss (`state.aux_loss`) and its parts.

Run:  python examples/space_3d_yaml.py [--frames 8 --size 6]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from seqpe_nd import build_position_encoding
from seqpe_nd.positions import load_space

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--frames", type=int, default=8, help="frames of the larger evaluation grid")
parser.add_argument("--size", type=int, default=6, help="rows (= columns) of patches per frame at evaluation")
args = parser.parse_args()
torch.manual_seed(0)

# Trained on 4 frames of 3 x 3 patches; SeqPE's regularizers sample positions up to 12 x 9 x 9.
# (configs/positions/video-8x14x14.yaml is the full-size one; these small regularizer batches keep
# this example fast.)
SPACE_YAML = """\
kind: grid
L: [4, 3, 3]          # training extent: frames, rows, columns
L_max: [12, 9, 9]     # how far the regularizers reach (27x the training volume)
contrastive: {batch: 4, num_candidates: 8}
ood: {num_starts: 2, num_teachers: 8}
"""
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "video.yaml"
    path.write_text(SPACE_YAML)
    space = load_space(path)
print(f"space: {space.ndim}-D grid, L {tuple(space.L)}, L_max {tuple(space.L_max)}")

train_pos = space.positions()  # (frames*rows*cols, 3), row-major
print("training positions:", tuple(train_pos.shape), "first three:", train_pos[:3].tolist())
print("their digit tokens:", tuple(space.tokenize(train_pos).shape), "(digits per axis + [CLS])")

# Sizes of your video transformer's attention: 4 heads of 16 dims, 2 layers, width 64.
sizes = dict(num_heads=4, head_dim=16, num_layers=2, d_model=64)
pe = build_position_encoding({"method": "seqpe", "integration": "attn_bias", "layers": 1}, space=space, **sizes)

# Training: positions come as (batch, tokens, 3); prepare() runs the encoder once for all layers.
pe.train()
state = pe.prepare(train_pos[None].expand(2, -1, -1), generator=torch.Generator().manual_seed(0))
print(f"train: aux_loss {state.aux_loss.item():.4f}, parts {sorted(state.logs)}")
assert state.aux_loss is not None and state.aux_loss.item() > 0

# Evaluation on a bigger grid: more frames and bigger frames than in training.
pe.eval()
big = (args.frames, args.size, args.size)
pos = space.positions(big)[None]  # (1, n, 3)
assert all(e > l for e, l in zip(big, space.L)), "the evaluation grid should outgrow the training grid"
with torch.no_grad():
    state = pe.prepare(pos)
    q = k = v = torch.randn(1, sizes["num_heads"], pos.shape[1], sizes["head_dim"])
    out = [pe.attend(q, k, v, state, layer, causal=False) for layer in range(sizes["num_layers"])]
print(f"eval grid {big}: positions {tuple(pos.shape)}, SeqPE embeddings {tuple(state.tensors['e_q'].shape)}, "
      f"attention out per layer {tuple(out[0].shape)}, aux_loss {state.aux_loss} (none in eval)")
assert out[0].shape == q.shape and all(bool(o.isfinite().all()) for o in out)
print("OK")

"""Your own training loop around a model with SeqPE: parameter groups, a warmup/decay schedule, logging.

Shows: `param_groups(model, lr, weight_decay)` gives AdamW groups where SeqPE's encoder has its own
`lr_scale`; a linear warmup then linear decay schedule sets `group["lr"] = rate * group["lr_scale"]`
every step, so the encoder keeps its share of the rate; the PE's regularizer parts (`out.pe_logs`:
L_delta, L_OOD, ...) are logged next to the task loss.

Why a scale of its own: under Adam, SeqPE's encoder learns badly above ~3e-4 (README, "Training SeqPE
so that it learns"), so `encoder_lr_max` (default 3e-4) caps it: at a peak rate of 3e-3 its scale is 0.1.
Setting every group to the bare `rate` would undo that cap. (A torch.optim.lr_scheduler such as
LambdaLR does the same as the loop below: it scales each group's own initial lr.)

Run:  python examples/own_training_loop.py [--steps 30] [--lr 3e-3]
"""

import argparse
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, param_groups, pe_sizes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=30, help="training steps")
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the model")
parser.add_argument("--log-every", type=int, default=5)
args = parser.parse_args()
torch.manual_seed(0)

# A tiny GPT-2 (a real user: GPT2LMHeadModel.from_pretrained("gpt2")) with SeqPE in place of wpe.
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                   bos_token_id=None, eos_token_id=None))
space = {"kind": "grid", "L": [32], "L_max": [1000],
         "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
attach_position_encoding(model, build_position_encoding({"method": "seqpe", "layers": 1}, space=space,
                                                        **pe_sizes(model)))

optimizer = torch.optim.AdamW(param_groups(model, lr=args.lr, weight_decay=0.1))
scales = sorted({round(g["lr_scale"], 6) for g in optimizer.param_groups})
print(f"lr scales of the groups: {scales} (the encoder's: min(1, 3e-4 / {args.lr}))")
assert math.isclose(scales[0], min(1.0, 3e-4 / args.lr), rel_tol=1e-5)

warmup = max(1, args.steps // 10)


def rate(step: int) -> float:
    """Linear warmup to the peak, then linear decay to 10 % of it."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * (1 - 0.9 * (step - warmup) / max(1, args.steps - 1 - warmup))


def batch(size: int = 8, n: int = 32) -> torch.Tensor:
    """Toy data with something to learn: each row counts up by one (mod vocab) from a random start."""
    return (torch.randint(0, 64, (size, 1)) + torch.arange(n)) % 64


model.train()
losses = []
for step in range(args.steps):
    for group in optimizer.param_groups:  # the schedule keeps each group's share of the rate
        group["lr"] = rate(step) * group["lr_scale"]
    ids = batch()
    out = model(ids, labels=ids)
    loss = out.loss  # with labels in training: the LM loss plus SeqPE's regularizers (out.lm_loss alone)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # optional, as in any loop
    optimizer.step()
    losses.append(out.lm_loss.item())
    if step % args.log_every == 0 or step == args.steps - 1:
        parts = {k: round(float(v), 4) for k, v in (out.pe_logs or {}).items() if k in ("loss_delta", "loss_ood")}
        lrs = sorted({round(g["lr"], 6) for g in optimizer.param_groups})
        print(f"step {step:3d}  lr {lrs}  lm loss {out.lm_loss.item():.3f}  pe {parts}")
print(f"lm loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
assert losses[-1] < losses[0] - 0.5, "the model should learn to count"
print("OK")

"""Attach SeqPE to a Hugging Face GPT-2 you already have, train it in your own loop, then generate.

Shows: one call (`attach_position_encoding`) replaces GPT-2's learned position table `wpe` by SeqPE,
keeping every other weight; with labels in training, `out.loss` is then the loss to optimize: the
LM loss (`out.lm_loss`) plus SeqPE's regularizer loss (`out.pe_aux_loss`); `param_groups` gives the optimizer groups
(SeqPE's encoder at its own learning rate); `model.generate` keeps working.

Run:  python examples/gpt2_attach.py [--steps 5]
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, param_groups, pe_sizes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5, help="training steps (a few: this only shows the loop runs)")
parser.add_argument("--seq-len", type=int, default=32, help="tokens per training sequence")
args = parser.parse_args()
torch.manual_seed(0)

# Your model. A real user would load one: GPT2LMHeadModel.from_pretrained("gpt2"). Here a tiny one,
# with no BOS/EOS so generate() produces exactly max_new_tokens tokens.
config = GPT2Config(vocab_size=256, n_layer=2, n_head=2, n_embd=32, n_positions=64,
                    bos_token_id=None, eos_token_id=None, pad_token_id=0)
model = GPT2LMHeadModel(config)

# The position space: 1-D text, trained on `seq_len` tokens; SeqPE's regularizers sample up to L_max.
# A small space needs small regularizer batches (the defaults are sized for the paper's L_max = 20 000).
space = {"kind": "grid", "L": [args.seq_len], "L_max": [1000],
         "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
# SeqPE sized for this model (heads, head dim, layers, width); a small encoder keeps the example fast.
pe = build_position_encoding({"method": "seqpe", "layers": 1}, space=space, **pe_sizes(model))
model = attach_position_encoding(model, pe)  # in place: the same object, now a GPT2WithPE
print(f"attached: {type(model).__name__}, wpe gone: {'transformer.wpe.weight' not in model.state_dict()}")
assert "transformer.wpe.weight" not in model.state_dict()

# Your own loop. param_groups puts SeqPE's encoder in a group of its own (capped at encoder_lr_max,
# 3e-4 by default) and takes biases, norms and the PE out of weight decay.
optimizer = torch.optim.AdamW(param_groups(model, lr=3e-3, weight_decay=0.1))
print("param groups (lr, weight decay, #tensors):",
      [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups])
ids = torch.randint(1, config.vocab_size, (4, args.seq_len))  # one batch of random ids stands in for your data
model.train()
losses = []
for step in range(args.steps):
    out = model(ids, labels=ids)
    # In training, SeqPE puts alpha*L_delta + beta*L_OOD in the output; other PEs (and eval mode) give None.
    assert out.pe_aux_loss is not None, "SeqPE in training mode should return its regularizer loss"
    loss = out.loss
    assert torch.allclose(loss, out.lm_loss + out.pe_aux_loss)  # any trainer optimizing `loss` trains SeqPE fully
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(out.lm_loss.item())
    print(f"step {step}: lm loss {out.lm_loss.item():.3f}  pe_aux_loss {out.pe_aux_loss.item():.4f}  "
          f"logged parts {sorted(out.pe_logs or {})}")
    assert torch.isfinite(loss)
assert losses[-1] < losses[0], "the LM loss should fall on a batch seen again and again"

# Generation works as for the stock model (the KV cache included).
model.eval()
prompt = torch.randint(1, config.vocab_size, (1, 8))
with torch.no_grad():
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
print("prompt   :", prompt[0].tolist())
print("generated:", generated[0, prompt.shape[1]:].tolist())
assert generated.shape == (1, 8 + 6) and torch.equal(generated[:, :8], prompt)
print("OK")

"""Train a Llama with SeqPE through `transformers.Trainer`, regularizers included, with no code beyond the attach.

Shows: with labels in training, a PE model's `out.loss` is the loss to optimize, the LM loss plus SeqPE's
alpha*L_delta + beta*L_OOD (as Hugging Face's Mixtral adds its router loss), so `Trainer` (and TRL,
Accelerate loops, ...) trains SeqPE as the paper does; `PELogCallback` adds the parts
(`pe/loss_delta`, `pe/loss_ood`, ...) to the Trainer's logs. `Trainer` needs `accelerate`
(`pip install accelerate`, part of this project's test extra).

Run:  python examples/hf_trainer.py [--steps 6]
"""

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import PELogCallback, attach_position_encoding, pe_sizes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=6)
args = parser.parse_args()
torch.manual_seed(0)

# A tiny Llama (a real user: LlamaForCausalLM.from_pretrained(...)) with SeqPE in place of its rotary.
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, bos_token_id=None,
                                     eos_token_id=None, pad_token_id=None))
space = {"kind": "grid", "L": [16], "L_max": [1000],
         "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
attach_position_encoding(model, build_position_encoding({"method": "seqpe", "layers": 1}, space=space,
                                                        **pe_sizes(model)))

ids = (torch.randint(0, 64, (32, 1)) + torch.arange(16)) % 64  # your data set: rows that count up by one
dataset = [{"input_ids": row, "labels": row} for row in ids]

with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(model=model, train_dataset=dataset, callbacks=[PELogCallback()],
                      args=TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                             learning_rate=3e-3, logging_steps=2, save_strategy="no",
                                             report_to=[], use_cpu=True, disable_tqdm=True))
    trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
for h in logs:
    print({k: round(v, 4) for k, v in h.items() if k in ("step", "loss", "pe/loss_delta", "pe/loss_ood")})
assert logs and all("pe/loss_delta" in h and "pe/loss_ood" in h for h in logs), "the regularizers' parts are logged"
print("OK")

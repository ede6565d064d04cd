"""ALiBi in a Llama, SeqPE in a Qwen2: attach, run, and decode with the KV cache.

Shows: the Llama family (Llama, Qwen2, Mistral) takes a position encoding the same way GPT-2 does;
the model's own rotary embedding becomes the identity and positions come from the PE. Greedy
`generate(..., use_cache=True)` gives, token by token, the argmax of one full forward over the
whole generated sequence: the cache (keys and their positions) is kept right.

Run:  python examples/llama_qwen2_attach.py [--new-tokens 6]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from seqpe_nd import build_position_encoding
from seqpe_nd.tasks.attach import attach_position_encoding, pe_sizes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--new-tokens", type=int, default=6, help="tokens to generate greedily")
args = parser.parse_args()
torch.manual_seed(0)

# Tiny configs; a real user would load e.g. LlamaForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
# or Qwen2ForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"). Grouped-query attention (2 KV heads) works.
sizes = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
llama = LlamaForCausalLM(LlamaConfig(**sizes))
qwen2 = Qwen2ForCausalLM(Qwen2Config(**sizes))

# One 1-D text space for both: trained on 32 tokens, SeqPE's regularizers reach 1000 (small settings
# keep them cheap; ALiBi ignores them).
space = {"kind": "grid", "L": [32], "L_max": [1000],
         "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
print("pe_sizes(llama):", pe_sizes(llama))
attach_position_encoding(llama, build_position_encoding({"method": "alibi"}, space=space, **pe_sizes(llama)))
attach_position_encoding(qwen2, build_position_encoding({"method": "seqpe", "layers": 1}, space=space,
                                                        **pe_sizes(qwen2)))

prompt = torch.randint(1, 256, (2, 8))
for name, model in (("llama + alibi", llama), ("qwen2 + seqpe", qwen2)):
    model.eval()
    with torch.no_grad():
        # A plain forward: logits for every position.
        logits = model(prompt).logits
        # Greedy decoding with the KV cache: each step feeds one new token and reuses the cached keys.
        cached = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
        # The same tokens from full forwards without any cache: position i's argmax predicts token i + 1.
        full = model(cached, use_cache=False).logits
    n = prompt.shape[1]
    want = full[:, n - 1:-1].argmax(-1)
    print(f"{name:14s} {type(model).__name__}: logits {tuple(logits.shape)}, generated {cached[0, n:].tolist()}, "
          f"full-forward argmax {want[0].tolist()}")
    assert torch.equal(cached[:, n:], want), f"{name}: cached decoding differs from the full forward"
print("OK: cached greedy decoding equals the full forward's argmax for both models")

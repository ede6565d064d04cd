"""Decoding helpers for causal LMs with explicit positions: the loss over labelled tokens only, and
greedy generation with the key-value cache (left padding, explicit positions), with the full
re-encoding as its reference.

Legend: b batch, n tokens, t generated tokens, w coordinates per position.
"""

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


def answer_loss(
    model: nn.Module,
    input_ids: Int[Tensor, "b n"],
    labels: Int[Tensor, "b n"],
    position_ids: Int[Tensor, "b n"] | Int[Tensor, "b n w"] | None = None,
    *,
    ignore_index: int = -100,
    **forward: Any,
) -> tuple[Float[Tensor, ""], int, Any]:
    """Summed cross entropy of the labelled (answer + EOS) tokens, their count, and the model output.

    Only the window of positions that predict a labelled token goes through the vocabulary
    projection (``logits_to_keep``), which on long prompts is most of the cost.
    """
    b, n = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
    scored = (labels[:, 1:] != ignore_index).any(0).nonzero()[:, 0]  # positions whose next token is labelled
    if len(scored) == 0:
        raise ValueError(f"the batch has no labelled token (every label is {ignore_index})")
    lo, hi = int(scored[0]), int(scored[-1]) + 1
    keep = torch.arange(lo, hi, device=input_ids.device)
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep, **forward)
    target = labels[:, lo + 1 : hi + 1]  # (b, hi - lo)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), target.flatten(), ignore_index=ignore_index, reduction="sum")
    return loss, int((target != ignore_index).sum()), out


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: Int[Tensor, "b n"],
    attention_mask: Int[Tensor, "b n"],
    position_ids: Int[Tensor, "b n"],
    *,
    max_new_tokens: int,
    eos_id: int,
    use_cache: bool = True,
) -> Int[Tensor, "b t"]:
    """Greedy continuation of left-padded prompts; rows that emitted EOS keep emitting it.

    With ``use_cache`` the prompt is encoded once and each step feeds one token with its explicit
    position; without it every step re-encodes the whole sequence (the reference the cache must match).
    """
    b = input_ids.shape[0]
    ids, mask, pos = input_ids, attention_mask, position_ids
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out: list[Tensor] = []
    cache = None
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        if use_cache:
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache, use_cache=True,
                        logits_to_keep=1)
            cache = res.cache
        else:
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        nxt = res.logits[:, -1].argmax(-1)  # (b,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None], pos[:, -1:] + 1
        ids, pos = torch.cat([ids, step_ids], 1), torch.cat([pos, step_pos], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)

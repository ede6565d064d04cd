"""Gradient clipping for the training loop: one norm over the model, or (``train.clip_grad_pe``) the position
encoders' own networks on a norm of their own, as the released SeqPE code clips its ``pe_model``."""

import torch
from torch import Tensor, nn

from seqpe_nd.encodings import PositionEncoding

def split_for_clipping(
    model: nn.Module, encodings: list[PositionEncoding], *, separate: bool
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's parameters, and (``separate``) those of its position encoders' own networks, apart."""
    own = {id(p): p for pe in encodings for p in pe.encoder_parameters()} if separate else {}
    return [p for p in model.parameters() if id(p) not in own], list(own.values())


def clip_gradients(
    groups: tuple[list[nn.Parameter], list[nn.Parameter]], max_norm: float, max_norm_pe: float | None
) -> tuple[Tensor | None, Tensor | None]:
    """Clip the model at ``max_norm`` and the position encoders' networks (if apart) at ``max_norm_pe`` (0 or
    None: not clipped); returns each group's norm before clipping (None where it is not clipped)."""
    model, encoders = groups
    norm = torch.nn.utils.clip_grad_norm_(model, max_norm) if max_norm > 0 else None
    norm_pe = torch.nn.utils.clip_grad_norm_(encoders, max_norm_pe) if encoders and max_norm_pe else None
    return norm, norm_pe

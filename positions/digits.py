"""Digit tokenization of integer coordinates in any base (the paper's §3.2).

Legend: ``*b`` batch dims, ``k`` digits per coordinate.

A coordinate ``c`` becomes ``k`` digits, most significant first, left-padded with zeros so that
digits of the same place value always sit in the same slot (the paper's Fig. 1).
"""

import torch
from jaxtyping import Int
from torch import Tensor


def num_digits(value: int, base: int) -> int:
    """Digits needed to write ``value`` (≥ 0) in ``base``; 0 needs one digit."""
    if base < 2:
        raise ValueError(f"base must be an integer >= 2, got {base}")
    n = 1
    while value >= base**n:
        n += 1
    return n


def _powers(base: int, k: int, device: torch.device) -> Tensor:
    return base ** torch.arange(k - 1, -1, -1, device=device, dtype=torch.int64)  # (k,)


def to_digits(values: Int[Tensor, "*b"], base: int, k: int) -> Int[Tensor, "*b k"]:
    """Left-padded base-``base`` digits of non-negative ``values``; callers check the range."""
    return (values.unsqueeze(-1) // _powers(base, k, values.device)) % base


def from_digits(digits: Int[Tensor, "*b k"], base: int) -> Int[Tensor, "*b"]:
    """Inverse of :func:`to_digits`."""
    return (digits * _powers(base, digits.shape[-1], digits.device)).sum(-1)


def perturb_digits(
    values: Int[Tensor, " n"], base: int, width: int, generator: torch.Generator
) -> Int[Tensor, " n"]:
    """One random lexical edit per value: swap two digits, remove one, add one, or replace one.

    Edits act on the significant digits (the number written without left padding), as the
    paper's Appendix A.2 describes for hard negatives; an added leading digit is never 0.
    Values must be below ``base**(width - 1)``, so that an added digit still fits in ``width``.
    """
    n = values.shape[0]
    dev = values.device
    digits = to_digits(values, base, width)  # (n, width), right-aligned
    nsig = (digits != 0).int().argmax(-1)  # index of the first non-zero digit
    nsig = torch.where(values == 0, torch.ones_like(nsig), width - nsig)  # significant digits
    first = width - nsig  # array index of the leading significant digit

    def rand_below(hi: Tensor) -> Tensor:
        return (torch.rand(n, generator=generator, device=dev) * hi).long().clamp(max=hi - 1)

    op = torch.randint(0, 4, (n,), generator=generator, device=dev)
    i = first + rand_below(nsig)
    j = first + rand_below(nsig)
    new_digit = torch.randint(0, base, (n,), generator=generator, device=dev)
    col = torch.arange(width, device=dev).expand(n, width)
    ii, jj = i[:, None], j[:, None]

    swapped = digits.clone()
    swapped.scatter_(1, ii, digits.gather(1, jj))
    swapped.scatter_(1, jj, digits.gather(1, ii))

    replaced = digits.clone()
    replaced.scatter_(1, ii, new_digit[:, None])

    # Remove the digit at i: everything left of it moves one slot right, a 0 enters at the front.
    shifted_right = torch.cat([torch.zeros_like(digits[:, :1]), digits[:, :-1]], dim=1)
    removed = torch.where(col <= ii, shifted_right, digits)

    # Add a digit before string position p ∈ [0, nsig]: the prefix moves one slot left.
    p = rand_below(nsig + 1)
    a = (first + p)[:, None]  # array index the new digit takes after the shift, minus one
    lead = torch.randint(1, base, (n,), generator=generator, device=dev)
    add_digit = torch.where(p == 0, lead, new_digit)[:, None]
    shifted_left = torch.cat([digits[:, 1:], torch.zeros_like(digits[:, :1])], dim=1)
    added = torch.where(col < a - 1, shifted_left, digits)
    added = torch.where(col == a - 1, add_digit, added)

    out = torch.stack([swapped, removed, added, replaced], dim=0)[op, torch.arange(n, device=dev)]
    return from_digits(out, base)

"""Samplers for the regularizers and the random start shift, for any position space.

Legend: ``b`` pivots, ``c`` candidates, ``s`` shifted regions, ``m`` teachers per region,
``g`` groups, ``w`` position width.

A space describes itself to the samplers as a few *box tables*, one row per group (a grid has
one group; a hybrid space one per modality): ``box_lo``/``box_train_hi``/``box_max_hi`` bound
each coordinate (``[lo, L)`` is D_train, ``[lo, L_max)`` the sampling range), ``box_window`` is
the local-window size and ``box_digits`` the digits of each coordinate (0: never perturbed or
shifted — a hybrid's modality id and padded dims). Everything below is written once against
these tables, so 1-D, 2-D, 3-D and hybrid spaces share one code path. All randomness comes from
the caller's ``torch.Generator``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from seqpe_nd.positions.digits import perturb_digits
from seqpe_nd.positions.settings import STRATEGIES, ContrastiveSettings, OODSettings, ShiftSettings


@runtime_checkable
class BoxSpace(Protocol):
    """What a sampler needs from a space."""

    base: int
    contrastive: ContrastiveSettings
    ood: OODSettings
    shift: ShiftSettings

    @property
    def width(self) -> int: ...
    @property
    def box_lo(self) -> Tensor: ...
    @property
    def box_train_hi(self) -> Tensor: ...
    @property
    def box_max_hi(self) -> Tensor: ...
    @property
    def box_window(self) -> Tensor: ...
    @property
    def box_digits(self) -> Tensor: ...
    def delta(self, a: Tensor, b: Tensor) -> Tensor: ...
    def group_of(self, pos: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class ContrastiveBatch:
    """One step's candidate sets for L_δ.

    ``valid`` masks candidates out of the softmax: copies of the pivot, repeated candidates,
    candidates tied with ``p⁺`` at the minimum distance (the released code's argmin picked one
    of them arbitrarily, turning equally near positions into negatives), and hard negatives
    that are not farther than the nearest random candidate (they must never be ``p⁺``).
    """

    pivots: Int[Tensor, "b w"]
    candidates: Int[Tensor, "b c w"]
    target: Int[Tensor, " b"]
    """Index of ``p⁺ = argmin δ(pivot, ·)`` among the valid candidates."""
    valid: Bool[Tensor, "b c"]
    strategy: Int[Tensor, " b"]
    """Index into ``STRATEGIES`` ("global", "global_hard", "local") per pivot."""
    is_hard: Bool[Tensor, "b c"]
    window_lo: Int[Tensor, "b c w"]
    """Box each candidate was drawn from (hard negatives: the whole sampling range)."""
    window_hi: Int[Tensor, "b c w"]
    distances: Float[Tensor, "b c"]


@dataclass(frozen=True)
class OODBatch:
    """Teacher positions in D_train and the student positions ``teacher + z`` (Eq. 10)."""

    teacher: Int[Tensor, "s m w"]
    student: Int[Tensor, "s m w"]
    shift: Int[Tensor, "s w"]


class Shift(NamedTuple):
    applied: bool
    z: Int[Tensor, "rows w"]
    """One start offset per row of the step (zero when not applied)."""


def _tables(space: BoxSpace, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.to(device) for t in (space.box_lo, space.box_train_hi, space.box_max_hi, space.box_window, space.box_digits))  # type: ignore[return-value]


def _uniform(lo: Tensor, hi: Tensor, generator: torch.Generator) -> Tensor:
    """Integers uniform in ``[lo, hi)``, elementwise (float64 keeps ranges up to 2**50 exact)."""
    u = torch.rand(lo.shape, generator=generator, device=lo.device, dtype=torch.float64)
    return lo + (u * (hi - lo)).long().clamp(max=(hi - lo - 1).clamp(min=0))


def _groups(num: int | tuple[int, ...], n_groups: int, generator: torch.Generator) -> Tensor:
    shape = (num,) if isinstance(num, int) else num
    return torch.randint(0, n_groups, shape, generator=generator, device=generator.device)


def sample_uniform(space: BoxSpace, num: int, generator: torch.Generator, *, train: bool = False) -> Int[Tensor, "num w"]:
    """``num`` positions uniform over ``[0, L_max)`` (``[0, L)`` if ``train``), group chosen uniformly."""
    lo, train_hi, max_hi, _, _ = _tables(space, generator.device)
    g = _groups(num, lo.shape[0], generator)
    return _uniform(lo[g], (train_hi if train else max_hi)[g], generator)


def _hard_negatives(space: BoxSpace, pivots: Tensor, generator: torch.Generator, tries: int = 4) -> tuple[Tensor, Tensor]:
    """1…max_hard_ops digit edits of each pivot, each edit on one coordinate; stays in range."""
    lo, _, max_hi, _, digits = _tables(space, generator.device)
    g = space.group_of(pivots)
    width = int(digits.max()) + 1  # room for one added digit
    movable = (digits[g] > 0).double()
    out, ok = pivots.clone(), torch.zeros(pivots.shape[0], dtype=torch.bool, device=pivots.device)
    for _ in range(tries):
        todo = (~ok).nonzero().squeeze(-1)
        if todo.numel() == 0:
            break
        x = pivots[todo].clone()
        n_ops = torch.randint(1, space.contrastive.max_hard_ops + 1, (todo.numel(),), generator=generator, device=x.device)
        rows = torch.arange(todo.numel(), device=x.device)
        for r in range(space.contrastive.max_hard_ops):
            coord = torch.multinomial(movable[todo], 1, generator=generator).squeeze(-1)
            new = perturb_digits(x[rows, coord], space.base, width, generator)
            x[rows, coord] = torch.where(n_ops > r, new, x[rows, coord])
        good = ((x >= lo[g[todo]]) & (x < max_hi[g[todo]])).all(-1) & (x != pivots[todo]).any(-1)
        out[todo] = torch.where(good.unsqueeze(-1), x, out[todo])
        ok[todo] = good
    return out, ok


_DENSE_WINDOW = 1 << 14  # windows up to this many positions are drawn from exactly; larger ones by redrawing


def _distinct_offsets(
    window: Int[Tensor, "g w"], g: Int[Tensor, "b c"], generator: torch.Generator
) -> Int[Tensor, "b c w"]:
    """Offsets inside each candidate's window, distinct among a pivot's candidates of one group.

    Sampling without replacement, as the released local sampler does: a pivot's candidates in
    group ``g`` are the first of a random ordering of the window's ``V_g`` positions; only when
    the window holds fewer than that many positions do offsets repeat (those copies are masked).
    """
    b, c = g.shape
    w = window.shape[1]
    out = torch.zeros(b, c, w, dtype=torch.int64, device=g.device)
    for group in range(window.shape[0]):
        extent = tuple(int(e) for e in window[group].tolist())
        volume = math.prod(extent)
        k = min(c, volume)
        if volume <= _DENSE_WINDOW:
            flat = torch.multinomial(
                torch.ones(b, volume, device=g.device), k, replacement=False, generator=generator
            )  # (b, k) distinct
        else:  # duplicates are rare: redraw them until none is left
            flat = torch.randint(0, volume, (b, k), generator=generator, device=g.device)
            for _ in range(64):
                srt, order = flat.sort(-1)
                dup = torch.zeros_like(flat, dtype=torch.bool)
                dup.scatter_(1, order[:, 1:], srt[:, 1:] == srt[:, :-1])
                if not bool(dup.any()):
                    break
                redraw = torch.randint(0, volume, flat.shape, generator=generator, device=g.device)
                flat = torch.where(dup, redraw, flat)
        mine = g == group
        rank = (mine.cumsum(-1) - 1).clamp(min=0) % k  # (b, c): the j-th candidate of this group takes draw j
        idx = flat.gather(1, rank)  # (b, c) flat index in the window, row-major
        coords = torch.stack(torch.unravel_index(idx, extent), dim=-1)  # (b, c, w)
        out = torch.where(mine.unsqueeze(-1), coords, out)
    return out


def _candidates(space: BoxSpace, pivots: Tensor, strategy: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
    settings = space.contrastive
    lo, _, max_hi, window, _ = _tables(space, generator.device)
    b, c, n_groups = pivots.shape[0], settings.num_candidates, lo.shape[0]

    # Global: uniform over the whole sampling range of a random group.
    g = _groups((b, c), n_groups, generator)
    win_lo, win_hi = lo[g], max_hi[g]
    cand = _uniform(win_lo, win_hi, generator)

    # Local: one window per pivot and group at a random offset (not centred on the pivot).
    offset = _uniform(lo.expand(b, -1, -1), (max_hi - window + 1).expand(b, -1, -1), generator)  # (b, g, w)
    local_lo = offset.gather(1, g.unsqueeze(-1).expand(-1, -1, pivots.shape[1]))  # (b, c, w)
    local_hi = local_lo + window[g]
    is_local = (strategy == STRATEGIES.index("local"))[:, None, None]
    win_lo, win_hi = torch.where(is_local, local_lo, win_lo), torch.where(is_local, local_hi, win_hi)
    cand = torch.where(is_local, local_lo + _distinct_offsets(window, g, generator), cand)

    # Global with hard negatives: the last n_hard candidates are lexical edits of the pivot.
    n_hard = round(settings.hard_fraction * c)
    is_hard = torch.zeros(b, c, dtype=torch.bool, device=pivots.device)
    hard_rows = (strategy == STRATEGIES.index("global_hard")).nonzero().squeeze(-1)
    if n_hard > 0 and hard_rows.numel() > 0:
        src = pivots[hard_rows].repeat_interleave(n_hard, dim=0)
        hard, ok = _hard_negatives(space, src, generator)
        hard, ok = hard.view(-1, n_hard, pivots.shape[1]), ok.view(-1, n_hard)
        cand[hard_rows, c - n_hard :] = torch.where(ok.unsqueeze(-1), hard, cand[hard_rows, c - n_hard :])
        is_hard[hard_rows, c - n_hard :] = ok
        gh = space.group_of(cand[hard_rows, c - n_hard :])
        win_lo[hard_rows, c - n_hard :], win_hi[hard_rows, c - n_hard :] = lo[gh], max_hi[gh]
    return cand, is_hard, win_lo, win_hi


def _positive(space: BoxSpace, pivots: Tensor, cand: Tensor, is_hard: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dist = space.delta(pivots.unsqueeze(1), cand)  # (b, c)
    c = cand.shape[1]
    same_as_pivot = (cand == pivots.unsqueeze(1)).all(-1)
    equal = (cand.unsqueeze(2) == cand.unsqueeze(1)).all(-1)  # (b, c, c)
    earlier_copy = (equal & torch.ones(c, c, dtype=torch.bool, device=cand.device).tril(-1)).any(-1)
    valid = ~same_as_pivot & ~earlier_copy
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    nearest_random = torch.where(valid & ~is_hard, dist, inf).amin(-1, keepdim=True)
    valid &= ~is_hard | (dist > nearest_random)
    masked = torch.where(valid, dist, inf)
    target = masked.argmin(-1)
    tied = (masked == masked.gather(1, target[:, None])) & valid
    tied.scatter_(1, target[:, None], False)
    valid &= ~tied
    return target, valid & torch.isfinite(masked.gather(1, target[:, None])), dist


def sample_contrastive(space: BoxSpace, generator: torch.Generator, batch: int | None = None) -> ContrastiveBatch:
    """Pivots uniform in ``[0, L_max)``, ``C`` candidates each, ``p⁺`` = argmin δ (Eq. 9)."""
    settings = space.contrastive
    b = batch or settings.batch
    probs = torch.tensor([settings.mix.get(s, 0.0) for s in STRATEGIES], dtype=torch.float64, device=generator.device)
    pivots = sample_uniform(space, b, generator)
    strategy = torch.multinomial(probs, b, replacement=True, generator=generator)
    cand, is_hard, win_lo, win_hi = _candidates(space, pivots, strategy, generator)
    target, valid, dist = _positive(space, pivots, cand, is_hard)
    for _ in range(20):  # tiny spaces can draw a set of copies of the pivot: redraw those rows
        empty = (~valid.any(-1)).nonzero().squeeze(-1)
        if empty.numel() == 0:
            break
        c2, h2, l2, u2 = _candidates(space, pivots[empty], strategy[empty], generator)
        cand[empty], is_hard[empty], win_lo[empty], win_hi[empty] = c2, h2, l2, u2
        target, valid, dist = _positive(space, pivots, cand, is_hard)
    else:
        raise ValueError("could not draw a candidate different from the pivot in 20 tries; the space is too small for L_δ")
    return ContrastiveBatch(pivots, cand, target, valid, strategy, is_hard, win_lo, win_hi, dist)


def _shift_range(space: BoxSpace, extent: Tensor, device: torch.device) -> Tensor:
    """Largest z per coordinate that keeps every group's region of ``extent`` inside L_max."""
    lo, _, max_hi, _, digits = _tables(space, device)
    room = torch.where(digits > 0, max_hi - lo - extent, torch.iinfo(torch.int64).max)
    return room.amin(0).clamp(min=0) * (digits > 0).any(0)


def ood_reach(space: BoxSpace) -> float:
    """The largest ``max_i z_i / L_i`` an OOD shift can reach inside L_max: ``ood.min_shift`` must not exceed it."""
    lo, train_hi, _, _, digits = _tables(space, torch.device("cpu"))
    extent = train_hi - lo
    zmax = _shift_range(space, extent, lo.device)
    ref = torch.where(digits > 0, extent, 0).amax(0).clamp(min=1)
    return float((zmax.double() / ref).amax())


def sample_ood(space: BoxSpace, generator: torch.Generator) -> OODBatch:
    """``num_starts`` regions: ``m`` teachers from D_train without replacement, students ``+ z``."""
    settings, dev = space.ood, generator.device
    lo, train_hi, _, _, digits = _tables(space, dev)
    extent = train_hi - lo  # (g, w)
    sizes = extent.prod(-1)
    total = int(sizes.sum())
    flat = torch.multinomial(torch.ones(settings.num_starts, total, device=dev), settings.teachers(total), generator=generator)
    ends = sizes.cumsum(0)
    g = torch.searchsorted(ends, flat, right=True)  # (s, m)
    rest = flat - (ends - sizes)[g]
    coords = []
    for i in reversed(range(extent.shape[1])):  # row-major unravel
        coords.append(rest % extent[g, i])
        rest = rest // extent[g, i]
    teacher = lo[g] + torch.stack(coords[::-1], dim=-1)

    # z: uniform up to the room each coordinate has; far enough out (min_shift · L on some axis).
    zmax = _shift_range(space, extent, dev)
    ref = torch.where(digits > 0, extent, 0).amax(0).clamp(min=1)
    tries = 64
    z = _uniform(torch.zeros(settings.num_starts, tries, zmax.shape[0], dtype=torch.int64, device=dev), (zmax + 1).expand(settings.num_starts, tries, -1), generator)
    far = ((z.double() / ref).amax(-1) >= settings.min_shift) if settings.min_shift > 0 else torch.ones(z.shape[:2], dtype=torch.bool, device=dev)
    reach = zmax.double() / ref
    if float(reach.amax()) < settings.min_shift:
        raise ValueError(
            f"ood.min_shift = {settings.min_shift} cannot be met: the largest shift per axis is {zmax.tolist()} "
            f"for training extents {ref.tolist()}; lower min_shift or raise L_max"
        )
    z = z[torch.arange(settings.num_starts, device=dev), far.int().argmax(-1)]  # first far draw
    missed = ~far.any(-1)
    if bool(missed.any()):  # a far region too thin for 64 tries: put one far axis on it directly
        axis = int(reach.argmax())
        lo_far = min(math.ceil(settings.min_shift * int(ref[axis]) - 1e-9), int(zmax[axis]))
        u = _uniform(torch.full((int(missed.sum()),), lo_far, device=dev), torch.full((int(missed.sum()),), int(zmax[axis]) + 1, device=dev), generator)
        z[missed, axis] = u
    student = apply_shift(space, teacher, z.unsqueeze(1))
    return OODBatch(teacher=teacher, student=student, shift=z)


def _shift_room(space: BoxSpace, extent: Sequence[int] | None, dev: torch.device) -> Tensor:
    """Largest start offset per coordinate for a region of ``extent`` (default: the training extent)."""
    lo, train_hi, _, _, _ = _tables(space, dev)
    ext = (train_hi - lo) if extent is None else torch.tensor(list(extent), dtype=torch.int64, device=dev).expand_as(lo)
    if ext.shape[-1] != space.width:
        raise ValueError(f"extent {list(extent or [])} needs {space.width} entries, one per coordinate")
    return _shift_range(space, ext, dev)


def shift_pool(space: BoxSpace, generator: torch.Generator, extent: Sequence[int] | None = None) -> Int[Tensor, "p w"]:
    """``shift.pool`` distinct start offsets (each keeps a region of ``extent`` inside L_max), row-major order
    unravelled from a random permutation: the starts a run's shifted steps choose from, as the released sampler's
    shuffled, down-sampled list of blocks."""
    dev = generator.device
    sizes = _shift_room(space, extent, dev) + 1  # choices per coordinate (1 where it never moves)
    total = int(sizes.prod())
    count = min(space.shift.pool or total, total)
    if total <= 1 << 24:
        flat = torch.randperm(total, generator=generator, device=dev)[:count]
    else:  # too many to permute: independent draws (a repeat has probability < count² / 2^25)
        flat = _uniform(torch.zeros(count, dtype=torch.int64, device=dev), torch.full((count,), total, device=dev), generator)
    coords = []
    for size in reversed(sizes.tolist()):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=-1)


def sample_shift(
    space: BoxSpace,
    generator: torch.Generator,
    extent: Sequence[int] | None = None,
    *,
    rows: int = 1,
    pool: Int[Tensor, "p w"] | None = None,
) -> Shift:
    """With probability ``shift.prob``, start offsets for this step's ``rows`` rows: ``min(rows, shift.starts)``
    distinct starts (from ``pool`` when given, else fresh draws), row r taking start r mod that number."""
    if rows < 1:
        raise ValueError(f"rows = {rows} is not allowed; a step has at least one row")
    dev = generator.device
    zmax = _shift_room(space, extent, dev)
    applied = bool(torch.rand((), generator=generator, device=dev) < space.shift.prob)
    if not applied:
        return Shift(applied=False, z=torch.zeros(rows, zmax.shape[0], dtype=torch.int64, device=dev))
    k = min(rows, space.shift.starts)
    if pool is None:
        starts = _uniform(torch.zeros(k, zmax.shape[0], dtype=torch.int64, device=dev), (zmax + 1).expand(k, -1), generator)
    else:
        if pool.shape[-1] != zmax.shape[0] or bool((pool > zmax).any()) or bool((pool < 0).any()):
            raise ValueError(f"the shift pool's offsets must lie in [0, {zmax.tolist()}] per coordinate for this extent")
        pick = torch.randperm(len(pool), generator=generator, device=dev)[:k] if len(pool) >= k else \
            torch.randint(0, len(pool), (k,), generator=generator, device=dev)
        starts = pool.to(dev)[pick]
    return Shift(applied=True, z=starts[torch.arange(rows, device=dev) % k])


def apply_shift(space: BoxSpace, pos: Int[Tensor, "*b w"], z: Int[Tensor, "*#b w"]) -> Int[Tensor, "*b w"]:
    """``pos + z`` on the coordinates that move; a hybrid's modality id and padded dims stay."""
    movable = space.box_digits.to(pos.device, non_blocking=True)[space.group_of(pos)] > 0
    return pos + torch.where(movable, z, 0)

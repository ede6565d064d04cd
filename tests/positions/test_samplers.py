"""Samplers for every kind of space: in range, p+ a true argmin, windows, D_z, shift."""

import pytest
import torch

from seqpe_nd.positions import STRATEGIES, load_space
from tests.positions.conftest import SPACES


def in_range(space, pos: torch.Tensor, hi: torch.Tensor) -> bool:
    g = space.group_of(pos)
    lo = space.box_lo[g]
    return bool(((pos >= lo) & (pos < hi[g])).all())


def test_samples_inside_l_max(space):
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        cb = space.sample_contrastive(gen)
        ob = space.sample_ood(gen)
        for pos in (cb.pivots, cb.candidates, ob.teacher, ob.student, space.sample_uniform(64, gen)):
            assert in_range(space, pos, space.box_max_hi)
            space.check(pos)  # tokenizable too
    assert in_range(space, space.sample_uniform(64, gen, train=True), space.box_train_hi)


def test_p_plus_is_the_true_argmin(space):
    cb = space.sample_contrastive(torch.Generator().manual_seed(1), batch=64)
    b, c, _ = cb.candidates.shape
    for i in range(b):
        dists = [space.delta(cb.pivots[i], cb.candidates[i, j]).item() for j in range(c)]
        valid = cb.valid[i].tolist()
        t = int(cb.target[i])
        assert valid[t]
        best = min(d for d, v in zip(dists, valid) if v)
        assert dists[t] == best
        # ties with p+ and copies of the pivot never enter the softmax
        assert sum(1 for d, v in zip(dists, valid) if v and d == best) == 1
        for j in range(c):
            if torch.equal(cb.candidates[i, j], cb.pivots[i]):
                assert not valid[j]
        # a duplicated candidate enters once
        kept = [tuple(cb.candidates[i, j].tolist()) for j in range(c) if valid[j]]
        assert len(kept) == len(set(kept))


def test_local_windows(space):
    cb = space.sample_contrastive(torch.Generator().manual_seed(2), batch=64)
    local = cb.strategy == STRATEGIES.index("local")
    assert bool(local.any())
    cand, lo, hi = cb.candidates[local], cb.window_lo[local], cb.window_hi[local]
    assert bool(((cand >= lo) & (cand < hi)).all())
    g = space.group_of(cand)
    assert torch.equal(hi - lo, space.box_window[g])  # the configured window, clamped to L_max
    assert bool((hi <= space.box_max_hi[g]).all())
    # windows sit at random offsets wherever the window is smaller than the range
    room = (space.box_max_hi - space.box_lo - space.box_window)[g] > 0
    assert bool(room.any())
    assert bool((lo - space.box_lo[g])[room].gt(0).any())


def local_rows(space, seed: int = 3, batch: int = 64):
    cb = space.sample_contrastive(torch.Generator().manual_seed(seed), batch=batch)
    local = (cb.strategy == STRATEGIES.index("local")).nonzero().squeeze(-1).tolist()
    assert local
    return cb, local


def test_local_candidates_are_drawn_without_replacement(space):
    """Released local sampler: distinct positions of the window, as many as it holds (up to C)."""
    cb, local = local_rows(space)
    for i in local:
        lo, hi = cb.window_lo[i], cb.window_hi[i]
        assert bool(((cb.candidates[i] >= lo) & (cb.candidates[i] < hi)).all())
        groups = space.group_of(cb.candidates[i])
        for g in set(groups.tolist()):
            mine = groups == g
            assert len({tuple(x) for x in lo[mine].tolist()}) == 1  # one window per pivot and group
            rows = [tuple(p) for p in cb.candidates[i][mine].tolist()]
            volume = int(space.box_window[g].prod())
            assert len(set(rows)) == min(len(rows), volume), f"pivot {i}: a local set repeats a position"


def test_local_window_smaller_than_c_is_used_whole():
    contrastive = {"mix": {"local": 1.0}, "num_candidates": 8, "local_window": 5}
    space = load_space({"L": 4, "L_max": 100, "contrastive": contrastive})
    cb, local = local_rows(space, batch=16)
    for i in local:
        rows = cb.candidates[i, :, 0].tolist()
        lo = int(cb.window_lo[i, 0, 0])
        assert set(rows) == set(range(lo, lo + 5))  # every position of the window, copies masked
        assert int(cb.valid[i].sum()) <= 5


def test_large_local_window_still_distinct():
    contrastive = {"mix": {"local": 1.0}, "local_window": [200, 200]}  # 40 000 positions: the redraw path
    space = load_space({"L": [8, 8], "L_max": [400, 400], "contrastive": contrastive})
    cb, local = local_rows(space, batch=8)
    for i in local:
        rows = [tuple(p) for p in cb.candidates[i].tolist()]
        assert len(set(rows)) == len(rows)
        assert bool(((cb.candidates[i] >= cb.window_lo[i]) & (cb.candidates[i] < cb.window_hi[i])).all())


@pytest.mark.parametrize("kind", ["2d", "3d", "hybrid"])
def test_hard_negatives(kind):
    space = load_space(SPACES[kind])
    cb = space.sample_contrastive(torch.Generator().manual_seed(3), batch=128)
    hard_rows = cb.strategy == STRATEGIES.index("global_hard")
    assert bool(cb.is_hard[hard_rows].any()) and not bool(cb.is_hard[~hard_rows].any())
    for i in hard_rows.nonzero().squeeze(-1).tolist():
        random_valid = cb.valid[i] & ~cb.is_hard[i]
        nearest_random = cb.distances[i][random_valid].min()
        for j in cb.is_hard[i].nonzero().squeeze(-1).tolist():
            h, p = cb.candidates[i, j], cb.pivots[i]
            assert not torch.equal(h, p)
            # edits change coordinates but never the modality of a hybrid position
            if kind == "hybrid":
                assert h[0] == p[0]
            if cb.valid[i, j]:
                assert cb.distances[i, j] > nearest_random  # p+ always comes from the random part
        assert not bool(cb.is_hard[i, cb.target[i]])


def test_ood_regions(space):
    ob = space.sample_ood(torch.Generator().manual_seed(4))
    s, m, w = ob.teacher.shape
    assert (s, m) == (space.ood.num_starts, space.ood.num_teachers or 32)
    assert in_range(space, ob.teacher, space.box_train_hi)  # teachers in D_train
    movable = space.box_digits[space.group_of(ob.teacher)] > 0
    # students are the same offsets shifted by one z per region, so |D_z| = |D_train|
    assert torch.equal(ob.student - ob.teacher, torch.where(movable, ob.shift[:, None, :], 0))
    for r in range(s):  # teachers are drawn without replacement
        assert len({tuple(p) for p in ob.teacher[r].tolist()}) == m
    # far enough out: max_i z_i / L_i >= min_shift
    ref = torch.where(space.box_digits > 0, space.box_train_hi - space.box_lo, 0).amax(0).clamp(min=1)
    assert bool(((ob.shift.double() / ref).amax(-1) >= space.ood.min_shift).all())


def test_ood_min_shift_that_cannot_be_met():
    with pytest.raises(ValueError, match=r"ood.min_shift = 1.0 is not allowed for this space: it must be in \[0, 0.2\]"):
        load_space({"L": 10, "L_max": 12, "ood": {"min_shift": 1.0, "num_teachers": 4}})  # set: refused at load
    space = load_space({"L": 10, "L_max": 12, "ood": {"num_teachers": 4}})  # the default 0.25: loads (no L_OOD may use it)
    with pytest.raises(ValueError, match="min_shift = 0.25 cannot be met"):
        space.sample_ood(torch.Generator().manual_seed(0))


def test_ood_min_shift_at_the_edge_of_reach_always_samples():
    """Only z = 14 on some axis is far enough (1 in 15 per axis): 64 tries used to miss now and then."""
    space = load_space({"L": [14, 14], "L_max": [28, 28], "ood": {"min_shift": 1.0, "num_starts": 64}})
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert bool((space.sample_ood(gen).shift.amax(-1) >= 14).all())


def test_start_shift(space):
    gen = torch.Generator().manual_seed(5)
    draws = [space.sample_shift(gen) for _ in range(2000)]
    rate = sum(d.applied for d in draws) / len(draws)
    assert abs(rate - space.shift.prob) < 0.03
    assert all(not bool(d.z.any()) for d in draws if not d.applied)
    assert any(bool(d.z.any()) for d in draws if d.applied)
    # a shifted training region stays inside L_max
    lo, hi = space.box_lo, space.box_train_hi
    for d in draws:
        if d.applied:
            top = space.apply_shift(hi - 1, d.z)
            assert in_range(space, top, space.box_max_hi)
            assert in_range(space, space.apply_shift(lo, d.z), space.box_max_hi)


@pytest.mark.parametrize("extent", [[128], [6, 6]])
def test_shifted_steps_take_distinct_starts_from_the_runs_pool(extent):
    """As released (pe_sampler.py): a pool of ``shift.pool`` distinct offsets drawn once, and each shifted step
    gives its rows ``shift.starts`` distinct starts from it (row r: start r mod starts)."""
    space = load_space({"L": extent, "L_max": [e * 7 for e in extent], "shift": {"prob": 1.0, "starts": 4, "pool": 50}})
    pool = space.shift_pool(torch.Generator().manual_seed(0))
    room = torch.tensor([6 * e for e in extent])  # L_max - L per coordinate
    assert pool.shape == (50, len(extent)) and len({tuple(p) for p in pool.tolist()}) == 50
    assert bool((pool >= 0).all()) and bool((pool <= room).all())
    torch.testing.assert_close(pool, space.shift_pool(torch.Generator().manual_seed(0)))  # a function of the seed
    gen, seen = torch.Generator().manual_seed(1), set()
    for _ in range(200):
        shift = space.sample_shift(gen, rows=10, pool=pool)
        assert shift.applied and shift.z.shape == (10, len(extent))
        starts = [tuple(z) for z in shift.z[:4].tolist()]
        assert len(set(starts)) == 4 and all(tuple(z) == starts[r % 4] for r, z in enumerate(shift.z.tolist()))
        seen.update(starts)
    assert seen == {tuple(p) for p in pool.tolist()}  # every pooled start is used, nothing else
    few = space.sample_shift(gen, rows=2, pool=pool).z  # fewer rows than starts: one start per row
    assert few.shape == (2, len(extent)) and tuple(few[0]) != tuple(few[1])
    fresh = space.sample_shift(gen, rows=8).z  # no pool: fresh draws, still 4 starts repeated over the rows
    assert torch.equal(fresh[:4], fresh[4:]) and bool((fresh <= room).all())


def test_hybrid_shift_keeps_modality_and_padding():
    space = load_space(SPACES["hybrid"])
    lay = space.layout("text:3, image:2x2")
    z = torch.tensor([5, 7, 2, 3, 4])
    out = space.apply_shift(lay.positions, z)
    assert torch.equal(out[:, 0], lay.positions[:, 0])
    assert out[:3, 1:].tolist() == [[7, 0, 0, 0], [8, 0, 0, 0], [9, 0, 0, 0]]
    assert out[3:, 1:].tolist() == [[10, 2, 3, 0], [10, 2, 4, 0], [10, 3, 3, 0], [10, 3, 4, 0]]


def test_samplers_are_deterministic_under_a_seed(space):
    a = space.sample_contrastive(torch.Generator().manual_seed(7))
    b = space.sample_contrastive(torch.Generator().manual_seed(7))
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.target, b.target)
    oa, ob = space.sample_ood(torch.Generator().manual_seed(7)), space.sample_ood(torch.Generator().manual_seed(7))
    assert torch.equal(oa.student, ob.student)


def test_strategy_mix_is_followed():
    space = load_space({"L": 8, "L_max": 1000, "contrastive": {"mix": {"local": 1.0}, "batch": 64}})
    cb = space.sample_contrastive(torch.Generator().manual_seed(0))
    assert bool((cb.strategy == STRATEGIES.index("local")).all())
    assert bool(((cb.window_hi - cb.window_lo) == 256).all())  # max(256, 5C) in 1-D


def test_tiny_space_still_finds_candidates():
    space = load_space({"L": 1, "L_max": 3, "contrastive": {"num_candidates": 2, "batch": 32}, "ood": {"min_shift": 0.0}})
    cb = space.sample_contrastive(torch.Generator().manual_seed(0))
    assert bool(cb.valid.any(-1).all())

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpe_nd.positions import NONE_ID, GridSpace, HybridSpace, load_space, num_digits, perturb_digits
from tests.positions.conftest import SPACES


def grid(**kw) -> GridSpace:
    space = load_space({"kind": "grid", **kw})
    assert isinstance(space, GridSpace)
    return space


def test_paper_2d_example():
    # Fig. 1: (2, 3) in a 4x4 image with k = 2 -> "0 2 0 3" then [CLS]
    space = grid(L=[4, 4], L_max=[100, 100])
    assert space.k == 2
    assert space.tokenize(torch.tensor([2, 3])).tolist() == [0, 2, 0, 3, space.cls_token]
    assert space.place_ids.tolist() == [0, 1, 2, 3, NONE_ID]  # O runs on across dims
    assert space.dim_ids.tolist() == [0, 0, 1, 1, NONE_ID]  # first k tokens D0, next k D1
    assert space.vocab_size == 11  # T has b + 1 rows


def test_paper_1d_example():
    # Appendix A.1: 123 with k = 3 -> "1 2 3"; no dimension embedding in 1-D
    space = grid(L=512, L_max=1000)
    assert space.k == 3
    assert space.tokenize(torch.tensor([[123]])).tolist() == [[1, 2, 3, space.cls_token]]
    assert space.num_dims == 0 and space.dim_ids.tolist() == [NONE_ID] * 4


def test_released_code_digit_counts():
    assert grid(L=512, L_max=20000).k == 5  # text
    assert grid(L=[14, 14], L_max=[100, 100]).k == 2  # image


@pytest.mark.parametrize(
    ("base", "value", "k", "digits"),
    [(16, 255, 2, [15, 15]), (16, 4096, 4, [1, 0, 0, 0]), (16, 171, 3, [0, 10, 11]), (2, 5, 3, [1, 0, 1]), (2, 0, 4, [0, 0, 0, 0])],
)
def test_other_bases(base, value, k, digits):
    space = grid(L=1, L_max=base**k, base=base)
    assert space.k == k
    tokens = space.tokenize(torch.tensor([value]))
    assert tokens.tolist() == [*digits, base]
    assert space.detokenize(tokens).tolist() == [value]


def test_k_given_and_checked():
    assert grid(L=4, L_max=100, k=4).tokenize(torch.tensor([7])).tolist() == [0, 0, 0, 7, 10]


@settings(max_examples=60, deadline=None)
@given(
    base=st.integers(2, 17),
    ndim=st.integers(1, 3),
    l_max=st.integers(1, 5000),
    data=st.data(),
)
def test_grid_roundtrip(base, ndim, l_max, data):
    space = grid(L=[1] * ndim, L_max=[l_max] * ndim, base=base)
    coords = data.draw(st.lists(st.lists(st.integers(0, base**space.digits - 1), min_size=ndim, max_size=ndim), min_size=1, max_size=8))
    pos = torch.tensor(coords)
    tokens = space.tokenize(pos)
    assert tokens.shape == (len(coords), space.seq_len)
    assert bool((tokens[:, :-1] < base).all())
    assert torch.equal(space.detokenize(tokens), pos)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_hybrid_roundtrip(seed):
    space = load_space(SPACES["hybrid"])
    pos = space.sample_uniform(32, torch.Generator().manual_seed(seed))
    tokens = space.tokenize(pos)
    assert torch.equal(space.detokenize(tokens), pos)
    # modality token first, [PAD] exactly where a modality lacks a local dim
    assert torch.equal(tokens[:, 0] - space.base - 2, pos[:, 0])
    local = tokens[:, 1 + space.time_digits : -1].view(32, space.local_ndim, space.local_digits)
    assert torch.equal((local == space.pad_token).all(-1), ~space.local_mask(pos[:, 0]))


def test_hybrid_slot_ids():
    space = load_space(SPACES["hybrid"])
    assert isinstance(space, HybridSpace)
    assert space.width == 2 + 3  # (modality, t, x1, x2, x3)
    assert space.seq_len == 1 + space.time_digits + 3 * space.local_digits + 1
    assert space.place_ids.tolist() == [*range(space.seq_len - 1), NONE_ID]
    assert space.dim_ids.tolist() == [NONE_ID, *[0] * space.time_digits, *[d for d in (1, 2, 3) for _ in range(space.local_digits)], NONE_ID]
    assert space.vocab_size == 10 + 2 + 3


def test_hybrid_layout():
    space = load_space(SPACES["hybrid"])
    lay = space.layout("text:3, image:2x2, text:2, video:2x1x2")
    assert lay.positions.tolist() == [
        [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0],
        [1, 3, 0, 0, 0], [1, 3, 0, 1, 0], [1, 3, 1, 0, 0], [1, 3, 1, 1, 0],
        [0, 4, 0, 0, 0], [0, 5, 0, 0, 0],
        [2, 6, 0, 0, 0], [2, 6, 0, 0, 1], [2, 6, 1, 0, 0], [2, 6, 1, 0, 1],
    ]
    assert lay.modality.tolist() == [0] * 3 + [1] * 4 + [0] * 2 + [2] * 4
    same = space.layout([("text", 3), ("image", (2, 2)), ("text", 2), ("video", (2, 1, 2))])
    assert torch.equal(same.positions, lay.positions)


def test_grid_positions_row_major():
    space = grid(L=[2, 3], L_max=[10, 10])
    assert space.positions().tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert space.positions((1, 2), start=(5, 7)).tolist() == [[5, 7], [5, 8]]


def _as_str(value: int, base: int) -> str:
    out = ""
    while value:
        value, d = divmod(value, base)
        out = "0123456789abcdef"[d] + out
    return out or "0"


@settings(max_examples=50, deadline=None)
@given(value=st.integers(0, 99_999), base=st.sampled_from([2, 10, 16]), seed=st.integers(0, 2**31 - 1))
def test_perturb_is_one_lexical_edit(value, base, seed):
    """Each result is the input's digit string after one swap, removal, insertion or replacement."""
    width = num_digits(value, base) + 1  # room for one added digit, as the samplers give it
    out = perturb_digits(torch.tensor([value] * 16), base, width, torch.Generator().manual_seed(seed))
    src = _as_str(value, base)
    alphabet = "0123456789abcdef"[:base]

    def neighbours(s: str) -> set[str]:
        n = set()
        for i in range(len(s)):
            for j in range(len(s)):
                t = list(s)
                t[i], t[j] = t[j], t[i]
                n.add("".join(t))
            n.add(s[:i] + s[i + 1 :])
            n.update(s[:i] + c + s[i + 1 :] for c in alphabet)
        for i in range(len(s) + 1):
            n.update(s[:i] + c + s[i:] for c in alphabet if i > 0 or c != "0")
        return {x.lstrip("0") or "0" for x in n}

    allowed = neighbours(src)
    for v in out.tolist():
        assert _as_str(v, base) in allowed, (value, v)



TRACE_A_FRESH_SPACE = """
import copy, json, torch, torch._dynamo as dynamo
from seqpe_nd.positions import load_space
class Reader(torch.nn.Module):  # an encoder holds its space; a deepcopied model's space has computed no table yet
    def __init__(self):
        super().__init__()
        self.space = copy.deepcopy(load_space("configs/positions/hybrid-text-image.yaml"))
    def forward(self, pos):
        return self.space.tokenize(pos, check=False).sum() + self.space.modalities[1].space.place_ids.sum()
reader = Reader()
fresh = "_local_ndims" not in reader.space.__dict__
explained = dynamo.explain(reader)(torch.tensor([[0, 1, 0, 0], [1, 2, 1, 1]]))
print(json.dumps({"fresh": fresh, "breaks": [r.reason.splitlines()[0] for r in explained.break_reasons],
                  "cached": reader.space._local_ndims is reader.space.__dict__["_local_ndims"]}))
"""


def test_a_spaces_tables_are_computed_once_and_traceable() -> None:
    """The cached tables (``place_ids``, a hybrid space's ``_local_ndims`` ...) are computed on first read without
    a lock (Python 3.11's ``functools.cached_property`` takes an RLock, which ``torch.compile`` cannot enter), so a
    space first read inside a compiled forward breaks no graph. Run in a fresh interpreter: the tests' runtime type
    checks change what dynamo traces."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", TRACE_A_FRESH_SPACE], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"fresh": True, "breaks": [], "cached": True}, result

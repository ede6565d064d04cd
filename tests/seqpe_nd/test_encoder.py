"""SeqPE encoder: shapes under jaxtyping + beartype, dedup, a loop reference, the inference table, checkpoints.

Legend: b batch, n tokens, w position width, s token slots, d model dim.
"""

import json
import math
from pathlib import Path

import jaxtyping
import pytest
import torch
import torch.nn.functional as F

from seqpe_nd.encoder import SeqPE, load_encoder, save_encoder
from seqpe_nd.positions import GridSpace, HybridSpace, load_space

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "positions"
SPACES = ["text-512", "image-14x14", "video-8x14x14", "hybrid-text-image"]
ATOL = RTOL = 1e-5  # float32: batched and per-row matmuls may sum in a different order


def space_of(name: str) -> GridSpace | HybridSpace:
    return load_space(CONFIGS / f"{name}.yaml")


def some_positions(space: GridSpace | HybridSpace) -> torch.Tensor:
    """A handful of in- and out-of-distribution positions, (n, w)."""
    if isinstance(space, HybridSpace):
        return space.layout("text:5, image:3x3, text:2", start=700).positions
    far = torch.tensor(space.L_max) - 1
    return torch.cat([space.positions([min(3, l) for l in space.L]), far[None], (far // 2)[None]])


def tiny(space: GridSpace | HybridSpace, **kwargs) -> SeqPE:
    torch.manual_seed(0)
    return SeqPE(space, 16, hidden=32, heads=2, dropout=0.0, **kwargs)


@pytest.mark.parametrize("name", SPACES)
def test_shapes_and_dtypes(name):
    space = space_of(name)
    enc = tiny(space)
    pos = some_positions(space)
    batched = pos.expand(3, *pos.shape)  # (3, n, w)
    out = enc(batched)
    assert out.shape == (3, pos.shape[0], 16) and out.dtype == torch.float32
    assert enc(pos[0]).shape == (16,)  # a single position
    a, b, c = enc.encode(batched, pos, pos[:2].int())
    assert (a.shape, b.shape, c.shape) == ((3, len(pos), 16), (len(pos), 16), (2, 16))
    assert enc.slot_embedding().shape == (space.seq_len, 32)


def test_annotations_are_checked_at_run_time():
    enc = tiny(space_of("text-512"))
    with pytest.raises(jaxtyping.TypeCheckError):
        enc.encode_unique(torch.zeros(3, dtype=torch.long))  # needs (u, w)


@pytest.mark.parametrize("name", SPACES)
def test_dedup_equals_naive_per_row_encoding(name, monkeypatch):
    space = space_of(name)
    enc = tiny(space)
    pos = some_positions(space)
    batched = torch.stack([pos, pos.flip(0)])  # (2, n, w): every position twice
    seen: list[int] = []
    real = enc.encode_unique
    monkeypatch.setattr(enc, "encode_unique", lambda p: seen.append(len(p)) or real(p))
    out = enc(batched)
    assert seen == [len(pos)]  # each distinct position once, one encoder call
    monkeypatch.undo()
    naive = torch.stack([enc.encode_unique(p[None])[0] for p in batched.reshape(-1, space.width)])
    torch.testing.assert_close(out.reshape(-1, 16), naive, atol=ATOL, rtol=RTOL)


def reference_forward(enc: SeqPE, pos: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8 written out: every slot through every layer, explicit masks, output at [CLS]."""
    space = enc.space
    tokens = space.tokenize(pos)
    out = []
    for row in tokens:
        x = []
        for slot, tok in enumerate(row.tolist()):
            u = enc.tok.weight[tok].clone()
            if space.place_ids[slot] >= 0:
                u += enc.place.weight[space.place_ids[slot]]
            if space.dim_ids[slot] >= 0:
                u += enc.dim.weight[space.dim_ids[slot]]
            x.append(u)
        x = torch.stack(x)  # (s, c)
        s = len(x)
        qk_norm = enc.config["qk_norm"]
        for blk in enc.blocks:
            h = blk.ln_1(x)
            q, k, v = (h @ blk.c_attn.weight.T + blk.c_attn.bias).chunk(3, dim=-1)
            heads, e = blk.heads, x.shape[-1] // blk.heads
            y = torch.zeros_like(x)
            for hd in range(heads):
                sl = slice(hd * e, (hd + 1) * e)
                for i in range(s):
                    keys = range(i + 1) if enc.config["causal"] else range(s)
                    qn = F.layer_norm(q[i, sl], (e,), blk.q_norm.weight, blk.q_norm.bias) if qk_norm else q[i, sl]
                    kn = [F.layer_norm(k[j, sl], (e,), blk.k_norm.weight, blk.k_norm.bias) if qk_norm else k[j, sl]
                          for j in range(s)]
                    scores = torch.stack([qn @ kn[j] / math.sqrt(e) for j in keys])
                    y[i, sl] = sum(p * v[j, sl] for p, j in zip(scores.softmax(0), keys))
            x = x + blk.c_proj(y)
            x = x + blk.mlp(blk.ln_2(x))
        out.append(enc.proj(enc.ln_f(x[-1])))
    return torch.stack(out)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["text-512", "hybrid-text-image"])
def test_matches_loop_reference(name, causal, qk_norm):
    space = space_of(name)
    enc = tiny(space, causal=causal, qk_norm=qk_norm)
    if qk_norm:  # trained norms, not their identity init
        with torch.no_grad():
            for blk in enc.blocks:
                for norm in (blk.q_norm, blk.k_norm):
                    norm.weight.normal_(1.0, 0.5)
                    norm.bias.normal_(0.0, 0.5)
    pos = some_positions(space)[:4]
    torch.testing.assert_close(enc(pos), reference_forward(enc, pos), atol=ATOL, rtol=RTOL)


def test_causal_and_bidirectional_differ():
    space = space_of("image-14x14")
    causal, bidi = tiny(space), tiny(space, causal=False)
    bidi.load_state_dict(causal.state_dict())
    pos = some_positions(space)
    assert not torch.allclose(causal(pos), bidi(pos))


def test_embeddings_o_and_d_follow_the_space():
    one = tiny(space_of("text-512"))
    assert one.dim is None  # 1-D: D fixed to 0 (App. A.1)
    assert one.tok.num_embeddings == 11 and one.place.num_embeddings == 5
    two = tiny(space_of("image-14x14"))
    assert two.dim is not None and two.dim.num_embeddings == 2 and two.place.num_embeddings == 4
    for enc in (one, two):
        assert torch.count_nonzero(enc.slot_embedding()[-1]) == 0  # [CLS]: no O, no D


@pytest.mark.parametrize("init", ["normal", "trunc_normal"])
def test_init_follows_released_code(init):
    torch.manual_seed(0)
    enc = SeqPE(space_of("text-512"), 128, hidden=128, init=init)
    w = enc.blocks[0].mlp[0].weight
    # Both are N(0, 0.02): trunc_normal_(std=.02) cuts at ±2 absolute (±100σ), not at ±2σ (std 0.0176).
    assert abs(w.std().item() - 0.02) < 1e-3
    assert w.abs().max() > 0.04  # 128·512 draws of N(0, 0.02) reach past 2σ; a ±2σ cut would not
    assert torch.count_nonzero(enc.blocks[0].c_attn.bias) == 0
    assert enc.config["heads"] == 2  # hidden // 64


def test_no_dropout_on_the_input_embeddings():
    """Released encoder: the first block reads T[token] + O[place] (+ D[dim]) as is, even in training."""
    space = space_of("image-14x14")
    torch.manual_seed(0)
    enc = SeqPE(space, 16, hidden=32, heads=2, dropout=0.9).train()
    seen: list[torch.Tensor] = []
    enc.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    pos = torch.tensor([[0, 7], [3, 12]])  # distinct and in key order, as the dedup hands them on
    enc(pos)
    tokens = space.tokenize(pos)  # (u, s)
    expected = enc.tok.weight[tokens] + enc.place.weight[enc.place_ids.clamp(min=0)] * (enc.place_ids >= 0)[:, None]
    expected = expected + enc.dim.weight[enc.dim_ids.clamp(min=0)] * (enc.dim_ids >= 0)[:, None]
    torch.testing.assert_close(seen[0], expected)
    dropouts = [name for name, m in enc.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(name.startswith("blocks.") for name in dropouts)  # residual dropout only


def test_paper_sizes():
    text = SeqPE(space_of("text-512"), 768)
    image = SeqPE(space_of("image-14x14"), 384, hidden=384, init="trunc_normal")
    assert round(sum(p.numel() for p in text.parameters()) / 1e6, 1) == 14.8
    assert round(sum(p.numel() for p in image.parameters()) / 1e6, 1) == 3.7


def test_width_follows_d_model_unless_given():
    """Without ``hidden`` the encoder is as wide as the model it feeds (issue 23: a fixed 768 gave a tiny model an
    encoder 160x its size); an explicit width keeps working."""
    small = SeqPE(space_of("text-512"), 32)
    assert small.config["hidden"] == 32 and small.tok.weight.shape[1] == 32 and small.proj.weight.shape == (32, 32)
    assert small.config["heads"] == 1  # hidden // 64, at least 1
    wide = SeqPE(space_of("text-512"), 32, hidden=48)
    assert wide.config["hidden"] == 48 and wide.proj.weight.shape == (32, 48)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden=48, heads=5), "hidden = 48 must be divisible by heads = 5"),
        (dict(layers=0), "layers = 0"),
        (dict(dropout=1.0), "dropout = 1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeqPE(space_of("text-512"), 16, **kwargs)


def test_bad_init_is_rejected():
    # Under the test hook beartype rejects the Literal first; without it the module raises ValueError.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="xavier"):
        SeqPE(space_of("text-512"), 16, init="xavier")  # type: ignore[arg-type]


def test_bad_positions():
    enc = tiny(space_of("image-14x14"))
    with pytest.raises(ValueError, match="coordinate 100 in dim 1 needs 3 digits"):
        enc(torch.tensor([[3, 100]]))
    with pytest.raises(ValueError, match="negative"):
        enc(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="last dim of 2"):
        enc(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="integer tensor"):
        enc.encode(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="needs a grid space"):
        tiny(space_of("hybrid-text-image")).export_table(4)


# -- inference table ---------------------------------------------------------------------------


def counting(enc: SeqPE, monkeypatch) -> list[int]:
    seen: list[int] = []
    real = enc.encode_unique
    monkeypatch.setattr(enc, "encode_unique", lambda p: seen.append(len(p)) or real(p))
    return seen


@pytest.mark.parametrize("name", SPACES)
def test_table_hits_and_extension(name, monkeypatch):
    space = space_of(name)
    enc = tiny(space).eval()
    pos = some_positions(space)
    want = enc.encode_unique(pos)
    seen = counting(enc, monkeypatch)
    with torch.no_grad():
        first = enc(pos)
        n_first = sum(seen)
        again = enc(pos.expand(2, *pos.shape))
        assert sum(seen) == n_first  # a hit: nothing encoded
        torch.testing.assert_close(first, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(again[1], first)
        if isinstance(space, HybridSpace):
            more = space.layout("text:3", start=1500).positions
        else:
            more = torch.minimum(pos + 1, torch.tensor(space.L_max) - 1)
        enc(more)
        new = {tuple(p) for p in more.tolist()} - {tuple(p) for p in pos.tolist()}
        assert sum(seen) - n_first == len(new)  # far corners make the table sparse: exactly the unseen
        torch.testing.assert_close(enc(more), enc.encode_unique(more), atol=ATOL, rtol=RTOL)


def test_span_is_a_view_of_the_table_in_inference(monkeypatch):
    """span(start, count) equals encoding the positions; in inference it is a view of the table (a decoding
    step reads its whole context without a gather), grown as a call of the last position would grow it."""
    space = space_of("text-512")
    enc = tiny(space).eval()
    want = enc.encode_unique(torch.arange(300, 340).view(-1, 1))
    with torch.no_grad():
        got = enc.span(300, 40)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert got._base is enc._table.emb  # a view, not a copy
        seen = counting(enc, monkeypatch)
        torch.testing.assert_close(enc.span(310, 5), want[10:15])
        assert seen == []  # served from the table
    with pytest.raises(ValueError, match="negative|>= 0|out of range|must be"):
        with torch.no_grad():
            enc.span(-1, 4)
    with pytest.raises(ValueError, match="count = 0"):
        enc.span(3, 0)
    with pytest.raises(ValueError, match="1-D space"):
        tiny(space_of("image-14x14")).eval().span(0, 3)
    enc.train()
    torch.testing.assert_close(enc.span(300, 40), enc(torch.arange(300, 340).view(-1, 1)))  # training: encoded


def test_grid_table_grows_densely_from_the_origin(monkeypatch):
    space = space_of("text-512")
    enc = tiny(space).eval()
    seen = counting(enc, monkeypatch)
    with torch.no_grad():
        enc(torch.arange(100)[:, None])
        enc(torch.arange(300)[None, :, None].expand(2, -1, -1))  # (2, 300, 1)
        assert seen == [100, 412] and enc._table.box == (512,)  # 1-D grows a block of 256 at a time
        enc(torch.tensor([[511]]))  # inside the block: a gather, nothing encoded (a decoding step)
        assert seen == [100, 412]
        enc(torch.tensor([[19_999]]))  # far away: switch to sorted keys, encode only that one
        assert seen == [100, 412, 1] and enc._table.box is None
        torch.testing.assert_close(enc(torch.tensor([[5], [19_999]])), enc.encode_unique(torch.tensor([[5], [19_999]])), atol=ATOL, rtol=RTOL)


def test_grid_table_is_dense_over_the_box(monkeypatch):
    space = space_of("image-14x14")
    enc = tiny(space).eval()
    seen = counting(enc, monkeypatch)
    with torch.no_grad():
        enc(torch.tensor([[13, 13]]))
    assert seen == [14 * 14]
    table = enc.export_table([14, 14])
    assert seen == [14 * 14]  # export reused the table
    torch.testing.assert_close(table, enc.encode_unique(space.positions()), atol=ATOL, rtol=RTOL)


def test_table_not_used_while_training_or_with_grad():
    space = space_of("text-512")
    enc = tiny(space)
    pos = torch.arange(8)[:, None]
    assert enc(pos).requires_grad and enc._table is None  # training mode: never a table
    enc.eval()
    assert enc(pos).requires_grad and enc._table is None  # eval with autograd on: computed, differentiable
    with torch.no_grad():
        enc(pos)
    assert enc._table is not None
    enc.train()
    assert enc._table is None  # training mode drops it


def test_stale_table_never_served_after_optimizer_step():
    space = space_of("text-512")
    enc = tiny(space).eval()
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    pos = torch.arange(32)[:, None]
    with torch.no_grad():
        before = enc(pos)
    enc(pos).square().sum().backward()  # still in eval mode: the table must notice the update
    opt.step()
    with torch.no_grad():
        after = enc(pos)
        fresh = enc.encode_unique(pos)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh, atol=ATOL, rtol=RTOL)

    other = tiny(space)
    other.proj.weight.data.mul_(3.0)
    enc.load_state_dict(other.state_dict())  # load_state_dict copies in place: also invalidates
    with torch.no_grad():
        torch.testing.assert_close(enc(pos), enc.encode_unique(pos), atol=ATOL, rtol=RTOL)


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["text-512", "hybrid-text-image"])
def test_save_and_load_round_trip(name, tmp_path):
    space = space_of(name)
    enc = tiny(space, causal=False, init="trunc_normal")
    path = save_encoder(enc, tmp_path / "enc")
    assert sorted(p.name for p in path.iterdir()) == ["encoder.json", "encoder.safetensors"]
    config = json.loads((path / "encoder.json").read_text())
    assert config["seqpe"]["causal"] is False and config["space"]["kind"] == space.kind
    back = load_encoder(path)
    assert back.space.model_dump() == space.model_dump() and back.config == enc.config
    pos = some_positions(space)
    torch.testing.assert_close(back(pos), enc(pos), atol=0, rtol=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no encoder.safetensors"):
        load_encoder(tmp_path)


def test_table_lookup_matches_embedding_gather():
    """The dense lookup is the APE gather on row-major indices."""
    space = space_of("image-14x14")
    enc = tiny(space).eval()
    table = enc.export_table([14, 14])
    pos = torch.tensor([[0, 0], [2, 5], [13, 13]])
    with torch.no_grad():
        torch.testing.assert_close(enc(pos), F.embedding(pos[:, 0] * 14 + pos[:, 1], table))


def test_table_follows_dtype_changes():
    space = space_of("text-512")
    enc = tiny(space).eval()
    pos = torch.arange(16)[:, None]
    with torch.no_grad():
        enc(pos)
        enc.double()  # parameters replaced by _apply: table and parameter list rebuilt
        out = enc(pos)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, enc.encode_unique(pos))

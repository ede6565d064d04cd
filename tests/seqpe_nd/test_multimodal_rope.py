"""M-RoPE (Qwen2-VL) on hybrid positions: reduces to 1-D RoPE on text, matches transformers' Qwen2-VL."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel, apply_rotary_pos_emb

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.multimodal import default_sections, mrope_ids
from seqpe_nd.positions import load_space

HYBRID = load_space(
    {
        "kind": "hybrid",
        "modalities": [
            {"name": "text", "space": {"L": 64, "L_max": 1000}},
            {"name": "image", "space": {"L": [4, 4], "L_max": [30, 30]}},
        ],
    }
)
H, E = 2, 16


def build(space, method: str = "mrope", **cfg):
    return build_position_encoding(
        {"method": method, **cfg}, space=space, num_heads=H, head_dim=E, num_layers=1, d_model=H * E
    )


def qwen_rope_index(layout_spec: list[tuple[str, int | tuple[int, int]]]) -> torch.Tensor:
    """transformers' own ``Qwen2VLModel.get_rope_index`` for a text/image sequence: (3, 1, n)."""
    types, grids = [], []
    for name, ext in layout_spec:
        if name == "text":
            types += [0] * int(ext)  # type: ignore[arg-type]
        else:
            h, w = ext  # type: ignore[misc]
            types += [1] * (h * w)
            grids.append([1, h, w])
    model = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=1)),
        get_vision_position_ids=partial(Qwen2VLModel.get_vision_position_ids, None),
    )
    ids = torch.zeros(1, len(types), dtype=torch.long)
    pos, _ = Qwen2VLModel.get_rope_index(model, ids, torch.tensor([types]), image_grid_thw=torch.tensor(grids))
    return pos


def test_text_only_is_exactly_1d_rope() -> None:
    torch.manual_seed(0)
    n = 23
    layout = HYBRID.layout(f"text:{n}", start=5)
    mpe, rope = build(HYBRID), build(load_space({"L": 64, "L_max": 1000}), "rope")
    q, k = torch.randn(2, H, n, E), torch.randn(2, H, n, E)
    got = mpe.transform_qk(q, k, mpe.prepare(layout.positions[None].expand(2, -1, -1)), 0)
    want = rope.transform_qk(q, k, rope.prepare(layout.positions[None, :, 1:2].expand(2, -1, -1)), 0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_ids_equal_transformers_get_rope_index() -> None:
    spec = [("text", 5), ("image", (3, 4)), ("text", 2), ("image", (4, 2)), ("text", 3)]
    layout = HYBRID.layout(", ".join(f"{m}:{e if isinstance(e, int) else 'x'.join(map(str, e))}" for m, e in spec))
    pos = layout.positions[None]
    ours = mrope_ids(pos, pos, torch.tensor([0, 2]))  # (1, n, 3)
    torch.testing.assert_close(ours.permute(2, 0, 1), qwen_rope_index(spec))


def test_rotation_equals_transformers_qwen2_vl() -> None:
    torch.manual_seed(0)
    spec = [("text", 4), ("image", (3, 3)), ("text", 3)]
    layout = HYBRID.layout("text:4, image:3x3, text:3")
    pe = build(HYBRID)
    n = layout.positions.shape[0]
    q, k = torch.randn(1, H, n, E), torch.randn(1, H, n, E)
    got_q, got_k = pe.transform_qk(q, k, pe.prepare(layout.positions[None]), 0)
    # transformers' Qwen2VLRotaryEmbedding.forward, with its mrope_section = our sections
    inv = 1.0 / (10_000.0 ** (torch.arange(0, E, 2, dtype=torch.float) / E))
    freqs = qwen_rope_index(spec)[..., None].float() * inv  # (3, 1, n, E/2)
    sections = list(pe.sections)
    assert sections == list(default_sections(E // 2, 3))
    parts = [m[i % 3] for i, m in enumerate(freqs.split(sections, dim=-1))]
    f = torch.cat(parts, -1)
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_scores_depend_only_on_id_differences() -> None:
    torch.manual_seed(0)
    pe = build(HYBRID)
    a = HYBRID.layout("text:3, image:2x2, text:2").positions[None]
    b = a.clone()
    b[..., 1] += 7  # the whole sequence later on the timeline
    q, k = torch.randn(1, H, a.shape[1], E), torch.randn(1, H, a.shape[1], E)
    sa = torch.einsum("bhne,bhme->bhnm", *pe.transform_qk(q, k, pe.prepare(a), 0))
    sb = torch.einsum("bhne,bhme->bhnm", *pe.transform_qk(q, k, pe.prepare(b), 0))
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)


def test_decoding_one_token_at_a_time_uses_full_sequence_ids() -> None:
    torch.manual_seed(0)
    pe = build(HYBRID)
    pos = HYBRID.layout("text:2, image:3x3, text:4").positions[None]
    n = pos.shape[1]
    q, k = torch.randn(1, H, n, E), torch.randn(1, H, n, E)
    full_q, full_k = pe.transform_qk(q, k, pe.prepare(pos), 0)
    last_q, last_k = pe.transform_qk(q[:, :, -1:], k, pe.prepare(pos[:, -1:], pos), 0)
    torch.testing.assert_close(last_q, full_q[:, :, -1:])
    torch.testing.assert_close(last_k, full_k)


def test_bad_sections_name_the_rule() -> None:
    with pytest.raises(ValueError, match=r"sections \[1, 1\] must give each of the 3 axes"):
        build(HYBRID, sections=[1, 1])
    with pytest.raises(ValueError, match="sum to 8"):
        build(HYBRID, sections=[2, 2, 2])

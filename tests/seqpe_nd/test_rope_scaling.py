"""RoPE context extension (PI, NTK, dynamic NTK, YaRN) against transformers' own ``rope_type`` code."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.encodings.functional import rope_inv_freq
from seqpe_nd.positions import load_space

HEAD_DIM, HEADS, TRAIN = 32, 4, 128


def rope(scaling: dict, base: float = 10_000.0):
    space = load_space({"L": TRAIN, "L_max": 20_000})
    return build_position_encoding({"method": "rope", "base": base, "scaling": scaling}, space=space, num_heads=HEADS,
                                   head_dim=HEAD_DIM, num_layers=1, d_model=HEADS * HEAD_DIM)


def hf(rope_type: str, *, factor: float, base: float = 10_000.0, seq_len: int | None = None, max_pos: int = TRAIN):
    params = {"rope_type": rope_type, "factor": factor, "rope_theta": base}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = TRAIN
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=max_pos,
                         rope_parameters=params)
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), seq_len=seq_len)


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_equals_transformers(rope_type: str, factor: float) -> None:
    pe = rope({"type": rope_type, "factor": factor}).eval()
    inv, temperature = pe.scaled(int(TRAIN * factor))
    want_inv, want_temperature = hf(rope_type, factor=factor)
    torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
    assert temperature == pytest.approx(want_temperature)


@pytest.mark.parametrize(("factor", "length"), [(2.0, 100), (2.0, 1000), (4.0, 4096)])
def test_dynamic_equals_transformers(factor: float, length: int) -> None:
    pe = rope({"type": "dynamic", "factor": factor}).eval()
    inv, temperature = pe.scaled(length)
    want_inv, want_temperature = hf("dynamic", factor=factor, seq_len=length)
    torch.testing.assert_close(inv, want_inv, rtol=1e-5, atol=0)
    assert temperature == want_temperature == 1.0


def test_ntk_is_the_base_scaled_by_the_factor() -> None:
    pe = rope({"type": "ntk", "factor": 8.0}).eval()
    inv, _ = pe.scaled(1024)
    torch.testing.assert_close(inv, rope_inv_freq(HEAD_DIM // 2, 1e4 * 8.0 ** (HEAD_DIM / (HEAD_DIM - 2))))


def test_training_sees_plain_rope_and_the_factor_follows_the_evaluated_length() -> None:
    pe = rope({"type": "linear"})
    plain = pe.inv_freq.clone()
    assert torch.equal(pe.train().scaled(4 * TRAIN)[0], plain)
    pe.eval()
    torch.testing.assert_close(pe.scaled(4 * TRAIN)[0], plain / 4)  # factor = evaluated length / training length
    torch.testing.assert_close(pe.scaled(TRAIN // 2)[0], plain)  # never below 1
    pos = torch.arange(4 * TRAIN).view(1, -1, 1)
    q = torch.randn(1, HEADS, 4 * TRAIN, HEAD_DIM)
    rotated, _ = pe.transform_qk(q, q, pe.prepare(pos), 0)
    # PI: position p rotates as p / 4 did without scaling
    plain_pe = rope({"type": "linear", "factor": 1.0}).eval()
    want, _ = plain_pe.transform_qk(q[:, :, ::4], q[:, :, ::4], plain_pe.prepare(pos[:, ::4] // 4), 0)
    torch.testing.assert_close(rotated[:, :, ::4], want, rtol=1e-4, atol=1e-4)


def test_yarn_temperature_scales_the_scores() -> None:
    pe = rope({"type": "yarn", "factor": 4.0}).eval()
    _, temperature = pe.scaled(4 * TRAIN)
    assert temperature == pytest.approx(0.1 * math.log(4.0) + 1.0)
    q = torch.ones(1, HEADS, 1, HEAD_DIM)
    rq, _ = pe.transform_qk(q, q, pe.prepare(torch.zeros(1, 1, 1, dtype=torch.long)), 0)  # position 0: no rotation
    torch.testing.assert_close(rq, q * temperature)


def test_scaling_needs_a_training_length() -> None:
    from seqpe_nd.encodings import RoPE, load_pe_config

    scaling = load_pe_config({"method": "rope", "scaling": {"type": "yarn"}}).scaling
    with pytest.raises(ValueError, match="needs original_length"):
        RoPE(base=1e4, num_heads=2, head_dim=8, num_layers=1, width=1, scaling=scaling)
    assert rope({"type": "yarn", "original_length": 64}).original_length == (64,)  # stated, it wins over the space's L


def test_axial_rope_scales_each_axis_by_its_own_factor() -> None:
    """N-D: the evaluated extent of each axis over its training extent, so a non-square change works."""
    space = load_space({"L": [4, 6], "L_max": [40, 40]})
    pe = build_position_encoding({"method": "rope_axial", "scaling": {"type": "linear"}}, space=space, num_heads=2,
                                 head_dim=16, num_layers=1, d_model=32).eval()
    inv, temperature = pe.scaled((8, 6))  # rows twice as many, columns as trained
    torch.testing.assert_close(inv[0], pe.inv_freq / 2)
    torch.testing.assert_close(inv[1], pe.inv_freq)
    assert temperature == 1.0
    grid = space.positions([8, 6])[None]  # (1, 48, 2)
    q = torch.randn(1, 2, 48, 16)
    rotated, _ = pe.transform_qk(q, q, pe.prepare(grid), 0)
    plain = build_position_encoding({"method": "rope_axial"}, space=space, num_heads=2, head_dim=16, num_layers=1,
                                    d_model=32).eval()
    even = grid[0, :, 0] % 2 == 0  # PI: row p rotates as unscaled row p / 2 did
    half = grid[:, even] // torch.tensor([2, 1])
    want, _ = plain.transform_qk(q[:, :, even], q[:, :, even], plain.prepare(half), 0)
    torch.testing.assert_close(rotated[:, :, even], want, rtol=1e-5, atol=1e-5)
    yarn = build_position_encoding({"method": "rope_axial", "scaling": {"type": "yarn"}}, space=space, num_heads=2,
                                   head_dim=16, num_layers=1, d_model=32).eval()
    assert yarn.scaled((8, 12))[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)  # temperature of the area's factor


def test_rope_mixed_interpolates_each_axis_and_refuses_the_rest() -> None:
    space = load_space({"L": [4, 6], "L_max": [40, 40]})
    kw = dict(space=space, num_heads=2, head_dim=16, num_layers=1, d_model=32)
    torch.manual_seed(0)
    plain = build_position_encoding({"method": "rope_mixed"}, **kw).eval()
    torch.manual_seed(0)
    pe = build_position_encoding({"method": "rope_mixed", "scaling": {"type": "linear"}}, **kw).eval()
    grid = space.positions([8, 6])[None]  # rows doubled: factor (2, 1)
    even = grid[0, :, 0] % 2 == 0
    torch.testing.assert_close(pe.angles(grid, 0)[:, :, even], plain.angles(grid[:, even] // torch.tensor([2, 1]), 0))
    assert torch.equal(pe.train().angles(grid, 0), plain.angles(grid, 0))  # training: plain
    with pytest.raises(ValueError, match="rope_mixed scaling 'yarn' is not defined"):
        build_position_encoding({"method": "rope_mixed", "scaling": {"type": "yarn"}}, **kw)

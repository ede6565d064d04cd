"""What an encoding is built from (``pe.spec``) and its derived buffers: recomputed exactly by ``reset_buffers`` after
anything (a meta-device build, ``to_empty``, a loader) left them uninitialised."""

import pytest
import torch

from seqpe_nd.encodings import METHODS, PESpec, build_position_encoding, load_pe_config
from seqpe_nd.positions import load_space

HEADS, HEAD_DIM, LAYERS, D = 2, 12, 2, 24
SPACES = {
    "1d": load_space({"L": 12, "L_max": 48}),
    "2d": load_space({"L": [3, 4], "L_max": [12, 16]}),
    "hybrid": load_space({"kind": "hybrid", "modalities": [
        {"name": "text", "space": {"L": 64, "L_max": 1000}},
        {"name": "image", "space": {"L": [4, 4], "L_max": [30, 30]}},
    ]}),
}
CASES = [
    (m, s) for m in METHODS for s in SPACES
    if not (m in ("rope", "alibi") and s != "1d")
    and not (m in ("ape_sin", "ape_learn", "rope", "rope_axial", "rope_mixed", "alibi") and s == "hybrid")
]


def build(method: str, space: str):
    config = {"method": method, **({"hidden": 16, "layers": 1, "heads": 2} if method == "seqpe" else {})}
    return build_position_encoding(config, space=SPACES[space], num_heads=HEADS, head_dim=HEAD_DIM, num_layers=LAYERS,
                                   d_model=D), config


def reset(pe) -> None:
    pe.apply(lambda m: m.reset_buffers() if hasattr(m, "reset_buffers") else None)


@pytest.mark.parametrize(("method", "space"), CASES)
def test_reset_buffers_recomputes_what_the_constructor_made(method: str, space: str) -> None:
    pe, config = build(method, space)
    assert pe.spec == PESpec(config=load_pe_config(config), space=SPACES[space])
    assert PESpec.model_validate(pe.spec.model_dump(mode="json")) == pe.spec  # the config.json round trip
    want = {name: b.clone() for name, b in pe.named_buffers()}
    with torch.no_grad():
        for b in pe.buffers():
            b.fill_(7)  # what uninitialised memory might hold
    reset(pe)
    for name, b in pe.named_buffers():
        assert torch.equal(b, want[name]), name
    with torch.device("meta"):  # built without memory, then materialised: the buffers come back too
        empty, _ = build(method, space)
    empty = empty.to_empty(device="cpu")
    reset(empty)
    for name, b in empty.named_buffers():
        assert torch.equal(b, want[name]), name


def test_an_encoding_constructed_by_hand_has_no_spec() -> None:
    from seqpe_nd.encodings import ALiBi

    assert ALiBi(backend="bias", num_heads=2, head_dim=4, num_layers=1, width=1).spec is None

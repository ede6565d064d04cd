"""Configs: YAML in, clear errors out, and every option reaching the code it names."""

from pathlib import Path
from typing import Any, get_args
from unittest import mock

import pydantic
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from seqpe_nd.encoder import Block
from seqpe_nd.encodings import METHODS, PEConfig, build_position_encoding, load_pe_config
from seqpe_nd.positions import get_distance, load_space

HYBRID = {
    "kind": "hybrid",
    "modalities": [
        {"name": "text", "space": {"L": 16, "L_max": 300}},
        {"name": "image", "space": {"L": [3, 3], "L_max": [20, 20]}},
    ],
}
GRID_2D = {"L": [4, 4], "L_max": [40, 40]}
SIZES = {"num_heads": 2, "head_dim": 16, "num_layers": 3, "d_model": 32}
CLASSES = get_args(get_args(PEConfig)[0])


def build(cfg: dict, space: dict | None = None):
    return build_position_encoding(cfg, space=load_space(space or {"L": 16, "L_max": 200}), **SIZES)


def test_every_method_has_one_config_class() -> None:
    assert sorted(c.model_fields["method"].default for c in CLASSES) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_yaml_configs_load_and_build(method: str, tmp_path: Path) -> None:
    path = tmp_path / "pe.yaml"
    path.write_text(yaml.safe_dump({"method": method, **({"hidden": 16, "layers": 1} if method == "seqpe" else {})}))
    pe = build_position_encoding(path, space=load_space({"L": 16, "L_max": 200}), **SIZES)
    assert pe.method == method
    assert load_pe_config(load_pe_config(path)) == load_pe_config(path)  # models round-trip


def test_seqpe_width_defaults_to_d_model() -> None:
    """``hidden`` unset (None) means the model's d_model; set, it is kept (issue 23)."""
    space = {"L": 8, "L_max": 64}
    assert load_pe_config({"method": "seqpe"}).hidden is None
    sizes = dict(num_heads=2, head_dim=16, num_layers=1, d_model=32)
    pe = build_position_encoding({"method": "seqpe", "layers": 1}, space=space, **sizes)
    assert pe.encoder.config["hidden"] == 32 and pe.encoder.tok.weight.shape[1] == 32
    assert build_position_encoding({"method": "seqpe", "hidden": 24, "layers": 1}, space=space, **sizes).encoder.config["hidden"] == 24


def test_every_field_is_documented() -> None:
    for cls in CLASSES:
        for name, field in cls.model_fields.items():
            assert name == "method" or field.description, f"{cls.__name__}.{name} has no docstring"


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="method: unknown method 'rope2d' .*allowed: .*rope_axial, .*seqpe"):
        load_pe_config({"method": "rope2d"})
    with pytest.raises(ValueError, match="integration: 'attn_scalar' is not allowed.*; allowed: attn_sum, attn_mul, attn_bias, input_add"):
        load_pe_config({"method": "seqpe", "integration": "attn_scalar"})
    with pytest.raises(ValueError, match="chebyshev, euclidean"):
        load_pe_config({"method": "alibi_nd", "distance": "cosine"})
    with pytest.raises(ValueError, match="backend: 'triton' is not allowed; allowed: auto, flex, bias"):
        load_pe_config({"method": "alibi", "backend": "triton"})


def test_options_of_other_methods_are_rejected_with_the_field_path() -> None:
    with pytest.raises(ValueError, match=r"^backend: unknown field 'backend'; allowed: base, method, scaling$") as err:
        load_pe_config({"method": "rope", "backend": "flex"})
    assert not isinstance(err.value, pydantic.ValidationError)
    with pytest.raises(ValueError, match=r"^base: unknown field 'base'; allowed: backend, method$"):
        load_pe_config({"method": "alibi", "base": 10.0})


@pytest.mark.parametrize("method", ["ape_sin", "ape_learn", "rope", "rope_axial", "rope_mixed", "alibi"])
def test_methods_without_a_hybrid_rule_say_so(method: str) -> None:
    with pytest.raises(ValueError, match="no rule for hybrid positions"):
        build({"method": method}, HYBRID)


@pytest.mark.parametrize("method", ["nope", "mrope", "alibi_nd", "seqpe"])
def test_methods_with_a_hybrid_rule_build(method: str) -> None:
    pe = build({"method": method, **({"hidden": 16, "layers": 1} if method == "seqpe" else {})}, HYBRID)
    assert pe.width == 4  # (modality, t, x_1, x_2)


def test_invalid_combinations_say_why() -> None:
    with pytest.raises(ValueError, match="rope is 1-D.*rope_axial"):
        build({"method": "rope"}, GRID_2D)
    with pytest.raises(ValueError, match="alibi is 1-D.*alibi_nd"):
        build({"method": "alibi"}, GRID_2D)
    with pytest.raises(ValueError, match="needs 2 entries"):
        build({"method": "ape_learn", "size": 8}, GRID_2D)
    with pytest.raises(ValueError, match="'bicubic' resamples 2-D tables, but the space is 1-D"):
        build({"method": "ape_learn", "interpolation": "bicubic"})
    with pytest.raises(ValueError, match="uses the space's own metric"):
        build({"method": "alibi_nd", "distance": "manhattan"}, HYBRID)
    with pytest.raises(ValueError, match="num_heads = 0"):
        build_position_encoding(
            {"method": "nope"}, space=load_space(GRID_2D), num_heads=0, head_dim=4, num_layers=1, d_model=4
        )


def smallest_mixed_magnitude(pe: Any) -> float:
    return pe.freqs[0].norm(dim=0).min().item()  # min over heads and i of |θ_{h,i}| (a vector over axes)


def encoder_calls(pe: Any, kind: type[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """(module, output) of each ``kind`` module that one SeqPE encoder pass runs, in call order.

    The pass encodes 2-D positions (0, 0) and (0, 1), whose digit tokens differ only in the last digit.
    """
    calls: list[tuple[nn.Module, Any]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, out)))
        for m in pe.encoder.modules()
        if isinstance(m, kind)
    ]
    pe.encoder.eval()
    try:
        with torch.no_grad():
            pe.encoder.encode_unique(torch.tensor([[0, 0], [0, 1]]))
    finally:
        for h in hooks:
            h.remove()
    return calls


def attention_heads(pe: Any) -> set[int]:
    """Head counts of the attention calls one encoder pass makes."""
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as spy:
        encoder_calls(pe, Block)
    return {call.args[0].shape[1] for call in spy.call_args_list}


def first_slot_ignores_later_digits(pe: Any) -> bool:
    """Whether the first block's output at slot 0 is the same for two positions that differ only in a later
    digit (needs 2+ layers: the last block computes only [CLS])."""
    _, out = encoder_calls(pe, Block)[0]
    return torch.equal(out[0, 0], out[1, 0])


def init_called(pe: Any) -> set[str]:
    """Which torch initializers the encoder's own weight init calls. Its values cannot tell: at std 0.02 the
    ±2 cut is at 100σ, and torch's trunc_normal_ then rejection-samples normal_, drawing the same numbers."""
    names = ("normal_", "trunc_normal_")
    with mock.patch.multiple(nn.init, **{n: mock.DEFAULT for n in names}) as spies:
        pe.encoder._init_weights(nn.Linear(8, 8))
    return {n for n in names if spies[n].called}


# (method, field, value, probe(pe) -> what the option controls, expected); 2-D where it matters.
PROBES: list[tuple[str, str, Any, Any, Any]] = [
    (
        "ape_sin",
        "base",
        100.0,
        lambda pe: pe.embed(pe.prepare(torch.tensor([[[1, 0]]])))[0, 0, 2].item(),
        pytest.approx(torch.tensor(100 ** (-2 / 16)).sin().item()),
    ),
    (
        "ape_sin",
        "scale",
        0.25,
        lambda pe: pe.embed(pe.prepare(torch.tensor([[[0, 0]]])))[0, 0, 1].item(),  # 0.25 · cos(0)
        pytest.approx(0.25),
    ),
    ("ape_learn", "size", (5, 6), lambda pe: tuple(pe.table.shape), (5, 6, 32)),
    ("ape_learn", "interpolation", "nearest", lambda pe: pe.interpolation, "nearest"),
    ("ape_learn", "resize", "exact", lambda pe: pe.target_size(torch.tensor([[[1, 1]]])).tolist(), [[2, 2]]),
    ("ape_learn", "init_std", 0.0, lambda pe: pe.table.abs().sum().item(), 0.0),
    ("rope", "base", 50.0, lambda pe: pe.inv_freq[1].item(), pytest.approx(50.0 ** (-1 / 8))),
    (
        "rope",
        "scaling",
        {"type": "linear", "factor": 4.0},
        lambda pe: pe.eval().scaled(64)[0][1].item(),  # evaluation: position interpolation by 4
        pytest.approx(10_000.0 ** (-1 / 8) / 4),
    ),
    ("rope_axial", "base", 50.0, lambda pe: pe.inv_freq[1].item(), pytest.approx(50.0 ** (-1 / 4))),
    (
        "rope_axial",
        "scaling",
        {"type": "linear", "factor": 2.0},
        lambda pe: pe.eval().scaled((8, 8))[0][0, 1].item(),  # evaluation: each axis interpolated by 2
        pytest.approx(100.0 ** (-1 / 4) / 2),
    ),
    ("rope_mixed", "base", 50.0, smallest_mixed_magnitude, pytest.approx(50.0 ** (-12 / 16), rel=1e-5)),
    ("rope_mixed", "per_layer", False, lambda pe: pe.freqs.shape[0], 1),
    (
        "rope_mixed",
        "scaling",
        {"type": "linear", "factor": 2.0},
        # evaluation at (2, 2) rotates as training at (1, 1): the difference is 0
        lambda pe: round(pe.eval().angles(torch.tensor([[[2, 2]]]), 0)[0, 0, 0, 0].item()
                         - pe.train().angles(torch.tensor([[[1, 1]]]), 0)[0, 0, 0, 0].item(), 6),
        0.0,
    ),
    ("mrope", "base", 50.0, lambda pe: pe.inv_freq[1].item(), pytest.approx(50.0 ** (-1 / 8))),
    ("mrope", "sections", (4, 4), lambda pe: pe.sections, (4, 4)),
    ("alibi", "backend", "bias", lambda pe: pe.score_backend, "bias"),
    ("alibi_nd", "distance", "chebyshev", lambda pe: pe.delta, get_distance("chebyshev")),
    ("alibi_nd", "backend", "flex", lambda pe: pe.score_backend, "flex"),
    ("seqpe", "integration", "attn_mul", lambda pe: pe.integration, "attn_mul"),
    ("seqpe", "per_layer", True, lambda pe: len(pe.w_pe), 3),
    ("seqpe", "encoder_lr_scale", 0.25, lambda pe: pe.encoder_lr_scale, 0.25),  # the trainer's groups: test_trainer
    ("seqpe", "encoder_lr_max", 1e-4, lambda pe: pe.encoder_lr_max, 1e-4),  # likewise
    ("seqpe", "w_pe_bias", False, lambda pe: [lin.bias for lin in pe.w_pe], [None]),
    ("seqpe", "w_pe_std", 0.3, lambda pe: round(pe.w_pe[0].weight.std().item(), 1), 0.3),
    ("seqpe", "qk_norm", True, lambda pe: {type(b.q_norm).__name__ for b in pe.encoder.blocks}, {"LayerNorm"}),
    # Encoder options: what the modules that run do, not the config dict the constructor stored.
    ("seqpe", "hidden", 24, lambda pe: {out.shape[-1] for _, out in encoder_calls(pe, Block)}, {24}),
    ("seqpe", "layers", 3, lambda pe: len(encoder_calls(pe, Block)), 3),
    ("seqpe", "heads", 3, attention_heads, {3}),
    ("seqpe", "mlp_ratio", 2.0, lambda pe: {out.shape[-1] for _, out in encoder_calls(pe, nn.GELU)}, {32}),
    ("seqpe", "dropout", 0.3, lambda pe: {m.p for m, _ in encoder_calls(pe, nn.Dropout)}, {0.3}),
    ("seqpe", "causal", False, first_slot_ignores_later_digits, False),
    ("seqpe", "init", "trunc_normal", init_called, {"trunc_normal_"}),
    *[
        ("seqpe", f, v, (lambda f: lambda pe: getattr(pe.regularizer, f))(f), v)
        for f, v in (("alpha", 0.5), ("beta", 0.25), ("ood_heads", 4), ("symmetric_kl", False), ("ood_reduction", "batchmean"))
    ],
]


def test_every_option_has_a_probe() -> None:
    probed = {(m, f) for m, f, *_ in PROBES}
    for cls in CLASSES:
        method = cls.model_fields["method"].default
        for name in cls.model_fields:
            assert name == "method" or (method, name) in probed, f"{method}.{name} is not checked to reach the code"


@pytest.mark.parametrize(("method", "field", "value", "probe", "want"), PROBES, ids=[f"{m}.{f}" for m, f, *_ in PROBES])
def test_every_option_reaches_the_code(method: str, field: str, value: Any, probe: Any, want: Any) -> None:
    torch.manual_seed(0)
    small = {"hidden": 16, "layers": 1} if method == "seqpe" and field not in ("hidden", "layers") else {}
    if method == "seqpe" and field == "heads":
        small = {"hidden": 24}
    if method == "seqpe" and field == "causal":
        small = {"hidden": 16, "layers": 2}  # the last layer computes only [CLS], which sees every slot
    default = build({"method": method, **small}, GRID_2D if method != "rope" and method != "alibi" else None)
    pe = build({"method": method, **small, field: value}, GRID_2D if method != "rope" and method != "alibi" else None)
    assert probe(pe) == want
    assert probe(default) != want, "the probe must tell the option from its default"


def test_a_new_method_is_its_own_config_class_plus_a_union_line() -> None:
    """Everything the factory needs from a method is on its config: the spaces it runs on and how it builds."""
    from typing import Annotated, ClassVar, Literal, Union, get_args

    from pydantic import Field, TypeAdapter

    from seqpe_nd.encodings import MethodConfig, Sizes
    from seqpe_nd.encodings.absolute import APESin

    class FourierConfig(MethodConfig):  # a Fourier-feature N-D encoding, written outside the package
        method: Literal["fourier"] = "fourier"
        hybrid: ClassVar[bool] = False

        def build(self, space, sizes: Sizes):
            return APESin(d_model=sizes.d_model, base=100.0, scale=1.0, width=space.width, **sizes.attention)

    members = (*get_args(get_args(PEConfig)[0]), FourierConfig)  # the union, one line longer
    cfg = TypeAdapter(Annotated[Union[members], Field(discriminator="method")]).validate_python({"method": "fourier"})
    assert isinstance(cfg, FourierConfig)
    grid3 = load_space({"L": [2, 3, 4], "L_max": [8, 8, 8]})
    assert cfg.unsupported(grid3) is None
    assert cfg.build(grid3, Sizes(num_heads=2, head_dim=6, num_layers=1, d_model=12)).width == 3
    assert "fourier has no rule for hybrid positions" in cfg.unsupported(load_space(HYBRID))

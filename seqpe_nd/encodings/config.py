"""One frozen pydantic config per method, a discriminated union on ``method``, and the factory.

A RoPE option cannot reach ALiBi: each config forbids unknown fields, so a typo or an option of
another method is an error naming the field, and an unknown ``method`` lists the valid ones.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PositiveInt, TypeAdapter, field_validator

from seqpe_nd.encodings.absolute import APELearn, APESin, NoPE, default_interpolation
from seqpe_nd.encodings.alibi import ALiBi, ALiBiND
from seqpe_nd.encodings.base import PositionEncoding
from seqpe_nd.encodings.multimodal import MultimodalRoPE
from seqpe_nd.encodings.rotary import RoPE, RoPEAxial, RoPEMixed
from seqpe_nd.positions import Frozen, GridSpace, HybridSpace, PositionSpace, get_distance, load_space
from seqpe_nd.positions.errors import validated
from seqpe_nd.positions.spaces import read_yaml_mapping



Backend = Literal["auto", "flex", "bias"]


class NoPEConfig(Frozen):
    """No position encoding."""

    method: Literal["nope"] = "nope"


class APESinConfig(Frozen):
    """Sinusoidal APE added to the input embeddings; N-D: per-axis sinusoids concatenated."""

    method: Literal["ape_sin"] = "ape_sin"
    base: float = Field(10_000.0, gt=1.0)
    """Wavelength base of the sinusoids (Vaswani et al.: 10000)."""
    scale: float | None = Field(None, gt=0.0)
    """Amplitude of the sinusoids: ``e_i = scale · sin/cos(...)``; unset means 1.0 (the formula) in this factory.
    The LM and QA recipes set an unset scale to GPT-2's token-embedding scale, ``init_std · √2``: a
    sinusoid coordinate has RMS 1/√2, so this matches it to the N(0, init_std) token embeddings (0.0283 at
    0.02); at 1.0 the ±1 sinusoids are ~35× the tokens and swamp them. Give a value to override."""


class APELearnConfig(Frozen):
    """Learned APE table, resampled beyond its extent (linear 1-D, bicubic 2-D, trilinear 3-D)."""

    method: Literal["ape_learn"] = "ape_learn"
    size: tuple[PositiveInt, ...] | None = None
    """Table extent per axis; default the space's training extent L."""
    interpolation: Literal["auto", "nearest", "linear", "bilinear", "bicubic", "trilinear"] = "auto"
    """Resampling mode; auto = linear (1-D), bicubic (2-D), trilinear (3-D). align_corners=False."""
    resize: Literal["grow", "exact"] = "grow"
    """grow: resample only axes the positions outgrow; exact: always to the positions' extent (timm)."""
    init_std: float = Field(0.02, ge=0.0)
    """Std of the normal init of the table (GPT-2 / timm: 0.02)."""

    @field_validator("size", mode="before")
    @classmethod
    def _scalar_is_1d(cls, value: Any) -> Any:
        return (value,) if isinstance(value, int) else value


class RoPEScaling(Frozen):
    """Context extension of a trained RoPE, applied in evaluation only (training sees plain RoPE)."""

    type: Literal["linear", "ntk", "dynamic", "yarn"]
    """``linear``: position interpolation (Chen et al.); ``ntk``: NTK-aware base scaling; ``dynamic``: NTK
    with the factor of each forward's length (transformers' ``dynamic``); ``yarn``: YaRN's ramp between
    interpolated and original frequencies, with its attention temperature (Peng et al.)."""
    factor: float | None = Field(None, ge=1.0)
    """Context extension factor; None: the evaluated length over ``original_length`` (at least 1), per forward."""
    original_length: PositiveInt | tuple[PositiveInt, ...] | None = None
    """The training extent (per axis for rope_axial); None: the space's L."""
    beta_fast: float = Field(32.0, gt=0)
    """YaRN: rotations above which a frequency is kept (extrapolated)."""
    beta_slow: float = Field(1.0, gt=0)
    """YaRN: rotations below which a frequency is interpolated."""
    attention_factor: float | None = Field(None, gt=0)
    """YaRN: scale of cos/sin (the attention temperature); None: ``0.1 ln(factor) + 1``."""


class RoPEConfig(Frozen):
    """RoPE on 1-D positions (use rope_axial or rope_mixed for N-D)."""

    method: Literal["rope"] = "rope"
    base: float = Field(10_000.0, gt=1.0)
    """Frequency base θ; larger rotates slower."""
    scaling: RoPEScaling | None = None
    """Context extension at evaluation: position interpolation, NTK, dynamic NTK or YaRN; None: plain RoPE."""


class RoPEAxialConfig(Frozen):
    """Axial RoPE (Heo et al. RoPE2D, any dims): head dim split across axes."""

    method: Literal["rope_axial"] = "rope_axial"
    base: float = Field(100.0, gt=1.0)
    """Frequency base; Heo et al. use 100 for ViTs (10000 makes it RoPE in 1-D)."""
    scaling: RoPEScaling | None = None
    """Context extension at evaluation, one factor per axis (evaluated extent / training extent unless given)."""


class RoPEMixedConfig(Frozen):
    """RoPE-Mixed (Heo et al.): learnable per-head frequency vectors mixing the axes."""

    method: Literal["rope_mixed"] = "rope_mixed"
    base: float = Field(10.0, gt=1.0)
    """Base of the initial frequency magnitudes (Heo et al. and timm: 10)."""
    per_layer: bool = True
    """One set of frequencies per layer (Heo et al.), or one shared by all layers."""
    scaling: RoPEScaling | None = None
    """Position interpolation at evaluation (type linear only: the learned frequencies have no NTK/YaRN form),
    one factor per axis."""


class MultimodalRoPEConfig(Frozen):
    """M-RoPE (Qwen2-VL): RoPE's bands split across (time, row, col); text gets one id on every axis."""

    method: Literal["mrope"] = "mrope"
    base: float = Field(10_000.0, gt=1.0)
    """Frequency base θ, as 1-D RoPE (a text-only sequence is exactly RoPE)."""
    sections: tuple[PositiveInt, ...] | None = None
    """Frequency bands per axis (timeline first), summing to head_dim/2; default Qwen2-VL's 1/4, 3/8, 3/8 split."""


class ALiBiConfig(Frozen):
    """ALiBi on 1-D positions with Press et al.'s slopes (use alibi_nd for N-D)."""

    method: Literal["alibi"] = "alibi"
    backend: Backend = "auto"
    """Where the bias runs: auto = FlexAttention on CUDA, one dense bias elsewhere; flex; bias."""


class ALiBiNDConfig(Frozen):
    """ALiBi on any space: bias -m_h · δ(p_q, p_k) with a distance."""

    method: Literal["alibi_nd"] = "alibi_nd"
    distance: str | None = None
    """Registered distance name; default the space's own distance (a hybrid space's metric)."""
    backend: Backend = "auto"
    """Where the bias runs: auto = FlexAttention on CUDA, one dense bias elsewhere; flex; bias."""

    @field_validator("distance")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        if name is not None:
            get_distance(name)  # the error lists the valid names
        return name


class SeqPEConfig(Frozen):
    """SeqPE: a learned sequential encoder of position digits, plus its regularizers."""

    method: Literal["seqpe"] = "seqpe"
    integration: Literal["attn_sum", "attn_mul", "attn_bias", "input_add"] = "attn_bias"
    """How PEs enter the model: Eq. 12 (attn_sum), 13 (attn_mul), 14 (attn_bias), or input_add."""
    per_layer: bool = False
    """One W_PE^{q,k} per layer, or one shared by all layers (the paper's LM setting)."""
    w_pe_bias: bool = True
    """W_PE^{q,k} with a bias, as released (text ``bias=True``; images ``bias=qkv_bias``, True in timm's ViT)."""
    w_pe_std: float = Field(0.02, gt=0.0)
    """Std of W_PE^{q,k}'s init (normal or trunc_normal, as ``init``; bias zero): the released 0.02."""
    hidden: PositiveInt | None = None
    """Encoder width; default (None) the model's ``d_model``, so a small model gets a small encoder (the paper's 768
    for text and 384 for images are its models' widths)."""
    layers: PositiveInt = 2
    """Encoder transformer layers."""
    heads: PositiveInt | None = None
    """Encoder attention heads; default hidden // 64 (at least 1)."""
    mlp_ratio: float = Field(4.0, gt=0.0)
    """Encoder MLP width ratio."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Residual dropout in the encoder blocks (none on the summed input embeddings, as released)."""
    causal: bool = True
    """Causal attention over the digit tokens (the paper's default)."""
    init: Literal["normal", "trunc_normal"] = "normal"
    """Encoder weight init, std 0.02: normal (text) or trunc_normal cut at ±2 absolute (images, as released)."""
    qk_norm: bool = False
    """QK-LayerNorm in the encoder's attention (not in the released encoder; it bounds the attention logits, but
    alone does not let the encoder learn at 3e-3: benchmarks/results/encoder_lr.md)."""
    encoder_lr_scale: float = Field(1.0, gt=0.0)
    """The encoder's learning rate as a multiple of the run's (warmup and decay apply alike). It reaches an
    optimizer through its parameter groups: the trainer's, or ``param_groups(model, lr, weight_decay)`` from
    ``seqpe_nd.tasks.engine.param_groups`` for one of your own (a plain ``AdamW(model.parameters())`` ignores it,
    and ``encoder_lr_max`` too)."""
    encoder_lr_max: float | None = Field(3e-4, gt=0.0)
    """The encoder's peak learning rate at most (its scale becomes ``min(encoder_lr_scale, encoder_lr_max /
    train.lr)``; None: no cap). Under Adam the encoder learns even its own objective worse as its rate rises:
    trained on α·L_δ + β·L_OOD alone (no task, 600 steps), L_δ reaches 1.35 of a 2.74 chance at 3e-4, 1.76 at
    1e-3 and stays at chance at 3e-3, where [CLS]'s first-layer attention sits entirely on itself; warmup,
    QK-LayerNorm, 4× larger regularizer batches, Adam's eps or β₂ leave it at 2.28-2.74
    (benchmarks/results/encoder_lr.md). The paper's runs were below the cap for text (5e-5) and at 1.2e-3
    with batch 1024 and 25k warmup steps for images; a small model's 3e-4 … 3e-3 keeps the encoder at 3e-4
    without a per-run value."""
    alpha: float = Field(0.1, ge=0.0)
    """Weight of L_δ (Eq. 9, 15); 0 disables it."""
    beta: float = Field(0.1, ge=0.0)
    """Weight of L_OOD (Eq. 10, 15); 0 disables it. At ``ood_reduction: mean`` it is the paper's β."""
    ood_heads: PositiveInt | None = None
    """Heads the embeddings split into for L_OOD; default the model's attention heads."""
    symmetric_kl: bool = True
    """L_OOD as KL(T‖S) + KL(S‖T), both with the teacher detached, as the released criterion does
    (``pe_criterion.py``: twice the pull of Eq. 10 at the same β); False: Eq. 10's one-directional KL(SG(P)‖S)."""
    ood_reduction: Literal["mean", "batchmean"] = "mean"
    """L_OOD's scale: ``mean`` = the released ``kl_div(reduction="mean")`` (per-row KL sum ÷ m teachers,
    averaged over rows, heads and regions), the scale the paper's β was tuned at; ``batchmean`` = the
    per-row KL sum averaged, m times larger (32× text, 64× images at the paper's settings)."""


PEConfig = Annotated[
    NoPEConfig
    | APESinConfig
    | APELearnConfig
    | RoPEConfig
    | RoPEAxialConfig
    | RoPEMixedConfig
    | MultimodalRoPEConfig
    | ALiBiConfig
    | ALiBiNDConfig
    | SeqPEConfig,
    Field(discriminator="method"),
]
"""Any position-encoding config; YAML picks one with ``method: <name>``."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(PEConfig)
METHODS: tuple[str, ...] = (
    "nope",
    "ape_sin",
    "ape_learn",
    "rope",
    "rope_axial",
    "rope_mixed",
    "mrope",
    "alibi",
    "alibi_nd",
    "seqpe",
)


class PESpec(Frozen):
    """What a PositionEncoding is built from, besides the backbone's sizes: its config and its position space.

    ``build_position_encoding`` records it on the encoding (``pe.spec``); a Hugging Face model with a PE saves
    ``spec.model_dump(mode="json")`` in its ``config.json`` and rebuilds the encoding from it on loading.
    """

    config: PEConfig
    """The position-encoding config, as validated (``method`` picks the variant)."""
    space: PositionSpace
    """The position space positions come from (``kind`` picks grid or hybrid)."""


def load_pe_config(source: str | Path | Mapping[str, Any] | BaseModel) -> PEConfig:
    """A validated config from a YAML file (relative to the working directory, else the shipped configs), a dict
    or a config model; a mistake is one ValueError naming the field, the value and what is allowed."""
    if isinstance(source, BaseModel):
        return validated(_ADAPTER, source.model_dump(), model=PEConfig)
    if isinstance(source, (str, Path)):
        data = read_yaml_mapping(source, what="position-encoding config", key="method")
        return validated(_ADAPTER, data, model=PEConfig, source=source)
    if not isinstance(source, Mapping):
        raise ValueError(f"a position-encoding config is a YAML path, a mapping or a config model, got {type(source).__name__}")
    return validated(_ADAPTER, dict(source), model=PEConfig)


_NO_HYBRID_RULE = (
    "{method} has no rule for hybrid positions (modality id, t, x_1..x_M): its coordinates are not "
    "axes of one grid. Use nope, alibi_nd (the hybrid metric) or seqpe on a hybrid space"
)


def _original(cfg: Any, space: GridSpace | HybridSpace) -> tuple[int, ...] | int | None:
    """The training extent a RoPE scaling extends: stated, else the grid space's L."""
    if cfg.scaling is None:
        return None
    if cfg.scaling.original_length is not None:
        return cfg.scaling.original_length
    return tuple(space.L) if isinstance(space, GridSpace) else None


def build_position_encoding(
    config: PEConfig | Mapping[str, Any] | str | Path,
    *,
    space: GridSpace | HybridSpace | Mapping[str, Any] | str | Path,
    num_heads: int,
    head_dim: int,
    num_layers: int,
    d_model: int,
) -> PositionEncoding:
    """The PositionEncoding a config names, sized for a backbone.

    Args:
        config: a config model, a dict or a YAML path (validated by ``load_pe_config``).
        space: the position space positions come from (fixes their width and dimensionality).
        d_model: width of the input embeddings (``embed``'s output, SeqPE's encoder output).

    The returned encoding's ``spec`` records ``config`` and ``space`` (a :class:`PESpec`).
    """
    cfg = load_pe_config(config)
    if isinstance(space, (str, Path, Mapping)):
        space = load_space(space)  # a YAML path or a mapping, as everywhere else
    pe = _build(cfg, space=space, num_heads=num_heads, head_dim=head_dim, num_layers=num_layers, d_model=d_model)
    pe.spec = PESpec(config=cfg, space=space)  # what save_pretrained records
    return pe


def _build(
    cfg: Any, *, space: Any, num_heads: int, head_dim: int, num_layers: int, d_model: int
) -> PositionEncoding:
    if not isinstance(space, (GridSpace, HybridSpace)):
        raise ValueError(f"space must be a position space, a YAML path or a mapping, got {type(space).__name__}")
    for name, value in (
        ("num_heads", num_heads),
        ("head_dim", head_dim),
        ("num_layers", num_layers),
        ("d_model", d_model),
    ):
        if value < 1:
            raise ValueError(f"{name} = {value} must be a positive integer")
    sizes = dict(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers)
    hybrid = isinstance(space, HybridSpace)
    ndim = None if hybrid else space.ndim
    method = cfg.method
    if hybrid and method in ("ape_sin", "ape_learn", "rope", "rope_axial", "rope_mixed", "alibi"):
        raise ValueError(_NO_HYBRID_RULE.format(method=method))
    if method == "rope" and ndim != 1:
        raise ValueError(
            f"rope is 1-D, but the space is {ndim}-D; use rope_axial (axes split) or rope_mixed (learned mixing)"
        )
    if method == "alibi" and ndim != 1:
        raise ValueError(f"alibi is 1-D, but the space is {ndim}-D; use alibi_nd, which biases by the space's distance")

    if method == "nope":
        return NoPE(width=space.width, **sizes)
    if method == "ape_sin":
        scale = 1.0 if cfg.scale is None else cfg.scale
        return APESin(d_model=d_model, base=cfg.base, scale=scale, width=space.width, **sizes)
    if method == "ape_learn":
        assert isinstance(space, GridSpace)
        size = cfg.size or space.L
        if len(size) != space.ndim:
            raise ValueError(f"ape_learn size {size} needs {space.ndim} entries for this {space.ndim}-D space")
        interpolation = default_interpolation(space.ndim) if cfg.interpolation == "auto" else cfg.interpolation
        table_ndim = {"linear": 1, "bilinear": 2, "bicubic": 2, "trilinear": 3}.get(interpolation, space.ndim)
        if table_ndim != space.ndim:
            raise ValueError(
                f"ape_learn interpolation {interpolation!r} resamples {table_ndim}-D tables, "
                f"but the space is {space.ndim}-D; "
                f"use 'nearest' or 'auto' ({default_interpolation(space.ndim)})"
            )
        return APELearn(
            d_model=d_model, size=size, interpolation=interpolation, resize=cfg.resize, init_std=cfg.init_std, **sizes
        )
    if method == "rope":
        return RoPE(base=cfg.base, width=1, scaling=cfg.scaling, original_length=_original(cfg, space), **sizes)
    if method == "rope_axial":
        return RoPEAxial(
            base=cfg.base, width=space.width, scaling=cfg.scaling, original_length=_original(cfg, space), **sizes
        )
    if method == "rope_mixed":
        return RoPEMixed(
            base=cfg.base, per_layer=cfg.per_layer, width=space.width, scaling=cfg.scaling,
            original_length=_original(cfg, space), **sizes,
        )
    if method == "mrope":
        return MultimodalRoPE(space=space, base=cfg.base, sections=cfg.sections, **sizes)
    if method == "alibi":
        return ALiBi(backend=cfg.backend, width=1, **sizes)
    if method == "alibi_nd":
        delta = space.delta if cfg.distance is None else get_distance(cfg.distance)
        if hybrid and cfg.distance is not None:
            raise ValueError("alibi_nd on a hybrid space uses the space's own metric; leave distance unset")
        return ALiBiND(delta=delta, backend=cfg.backend, width=space.width, **sizes)
    return _build_seqpe(cfg, space=space, d_model=d_model, **sizes)


def _check_regularizers(cfg: SeqPEConfig, *, space: GridSpace | HybridSpace, d_model: int, num_heads: int) -> None:
    """What would make the first training step's regularizer sampling fail, named now (the field, the value, the
    allowed range), before any weight is built."""
    if cfg.beta > 0:
        try:
            space.check_ood_reach()
        except ValueError as err:
            raise ValueError(f"pe.beta = {cfg.beta} trains L_OOD, but space: {err} (or set pe.beta: 0)") from None
        heads = cfg.ood_heads or num_heads
        if d_model % heads:
            field = "pe.ood_heads" if cfg.ood_heads else "the model's num_heads (pe.ood_heads unset)"
            raise ValueError(f"{field} = {heads} must divide d_model = {d_model}: L_OOD splits the embeddings into that many heads")
    if cfg.alpha > 0 and space.regularizer_volume() < 2:
        raise ValueError(
            f"pe.alpha = {cfg.alpha} trains L_δ, which needs at least 2 positions within L_max to contrast; this space has "
            f"{space.regularizer_volume()} (raise L_max or set pe.alpha: 0)"
        )


def _build_seqpe(
    cfg: SeqPEConfig, *, space: GridSpace | HybridSpace, d_model: int, num_heads: int, head_dim: int, num_layers: int
) -> PositionEncoding:
    # Imported here so the baselines work while the encoder module is absent or being edited.
    from seqpe_nd.encoder import SeqPE
    from seqpe_nd.encodings.seqpe import SeqPEEncoding
    from seqpe_nd.regularizers import SeqPERegularizer

    _check_regularizers(cfg, space=space, d_model=d_model, num_heads=num_heads)
    encoder = SeqPE(
        space,
        d_model,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        dropout=cfg.dropout,
        causal=cfg.causal,
        init=cfg.init,
        qk_norm=cfg.qk_norm,
    )
    regularizer = None
    if cfg.alpha > 0 or cfg.beta > 0:
        regularizer = SeqPERegularizer(
            space,
            alpha=cfg.alpha,
            beta=cfg.beta,
            ood_heads=cfg.ood_heads or num_heads,
            symmetric_kl=cfg.symmetric_kl,
            ood_reduction=cfg.ood_reduction,
        )
    return SeqPEEncoding(
        encoder=encoder,
        regularizer=regularizer,
        integration=cfg.integration,
        per_layer=cfg.per_layer,
        w_pe_bias=cfg.w_pe_bias,
        w_pe_std=cfg.w_pe_std,
        num_heads=num_heads,
        head_dim=head_dim,
        num_layers=num_layers,
        encoder_lr_scale=cfg.encoder_lr_scale,
        encoder_lr_max=cfg.encoder_lr_max,
    )

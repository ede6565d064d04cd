"""Position spaces, declared in YAML: N-D grids and hybrid (interleaved) sequences.

Legend: ``*b`` batch dims, ``w`` position width (coordinates per position), ``s`` digit tokens
per position (CLS included), ``g`` groups (1 for a grid, one per modality for a hybrid),
``n``/``m`` counts.

Every space exposes the same small surface, so the encoder, the regularizers and the adapters
never ask which kind they hold:

* ``width`` coordinates per position; ``check(pos)`` raises a ``ValueError`` naming the bad
  value and the limit;
* ``tokenize(pos)`` → digit tokens with ``[CLS]`` last, plus the per-slot ``place_ids`` (O) and
  ``dim_ids`` (D) the encoder adds; ``detokenize`` inverts it;
* ``delta(a, b)``, the distance δ;
* samplers (in :mod:`seqpe_nd.positions.samplers`), driven by per-group boxes: ``box_lo``,
  ``box_train_hi``, ``box_max_hi``, ``box_window``, ``box_digits``.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import torch
from jaxtyping import Bool, Float, Int
from pydantic import ConfigDict, Field, PositiveInt, TypeAdapter, field_validator, model_validator
from torch import Tensor

from seqpe_nd.positions import samplers
from seqpe_nd.positions.digits import from_digits, num_digits, to_digits
from seqpe_nd.positions.distances import get_distance
from seqpe_nd.positions.errors import find_config_file, read_yaml_file, validated
from seqpe_nd.positions.settings import ContrastiveSettings, Frozen, OODSettings, ShiftSettings

T = TypeVar("T")
NONE_ID = -1
"""``place_ids``/``dim_ids`` value of a slot that gets no O or D embedding ([CLS], modality)."""


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, int) else value


_CPU = torch.device("cpu")


def _int_tensor(values: Sequence[int]) -> Tensor:
    # Cached tables live on the CPU whatever the ambient default device (meta, cuda) is; samplers
    # and the encoder move them to where they are used.
    return torch.tensor(list(values), dtype=torch.int64, device=_CPU)


class cached(Generic[T]):  # noqa: N801 (a decorator, named like functools.cached_property)
    """``functools.cached_property`` without its lock: computed on first read, kept in the instance's ``__dict__``.
    Python 3.11's version takes an ``RLock`` that ``torch.compile`` cannot trace, which breaks the graph of a model
    whose space first computes a table inside a compiled forward (a ``deepcopy`` of a model, say)."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn, self.__doc__ = fn, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


class _SpaceMixin:
    """Samplers and shared helpers, written once against the box tables."""

    model_config = ConfigDict(ignored_types=(cached,))  # merged into each space's Frozen config

    def __eq__(self, other: object) -> bool:
        # pydantic compares __dict__, which also holds cached tensor tables: compare the fields
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.model_dump())))  # type: ignore[attr-defined]

    # -- samplers -------------------------------------------------------------------------
    def sample_uniform(self, num: int, generator: torch.Generator, *, train: bool = False) -> Int[Tensor, "num w"]:
        """``num`` positions drawn uniformly from ``[0, L_max)`` (or ``[0, L)`` when ``train``)."""
        return samplers.sample_uniform(self, num, generator, train=train)  # type: ignore[arg-type]

    def sample_contrastive(
        self, generator: torch.Generator, batch: int | None = None
    ) -> "samplers.ContrastiveBatch":
        """Pivots, candidates and ``p⁺`` for L_δ, mixing strategies as ``contrastive.mix`` says."""
        return samplers.sample_contrastive(self, generator, batch)  # type: ignore[arg-type]

    def sample_ood(self, generator: torch.Generator) -> "samplers.OODBatch":
        """Teacher positions in D_train and the same positions shifted into D_z (Eq. 10)."""
        return samplers.sample_ood(self, generator)  # type: ignore[arg-type]

    def sample_shift(
        self,
        generator: torch.Generator,
        extent: Sequence[int] | None = None,
        *,
        rows: int = 1,
        pool: Int[Tensor, "p w"] | None = None,
    ) -> "samplers.Shift":
        """Whether this training step is shifted, and each row's start offset (Appendix A.5; ``shift.starts``
        distinct starts a step, from ``pool`` when given: see :meth:`shift_pool`)."""
        return samplers.sample_shift(self, generator, extent, rows=rows, pool=pool)  # type: ignore[arg-type]

    def shift_pool(self, generator: torch.Generator, extent: Sequence[int] | None = None) -> Int[Tensor, "p w"]:
        """The ``shift.pool`` distinct start offsets a run's shifted steps choose from (drawn once per run)."""
        return samplers.shift_pool(self, generator, extent)  # type: ignore[arg-type]

    def apply_shift(self, pos: Int[Tensor, "*b w"], z: Int[Tensor, "*#b w"]) -> Int[Tensor, "*b w"]:
        """Shift positions by ``z`` (broadcast over ``pos``); for a hybrid, modality ids and padded dims never move."""
        return samplers.apply_shift(self, pos, z)  # type: ignore[arg-type]

    # -- shared checks --------------------------------------------------------------------
    def regularizer_volume(self) -> int:
        """Positions the regularizers sample from: the L_max box's size, summed over a hybrid's groups."""
        extent = (self.box_max_hi - self.box_lo).clamp(min=1)  # type: ignore[attr-defined]
        moves = self.box_digits > 0  # type: ignore[attr-defined]
        return int(torch.where(moves, extent, 1).prod(-1).sum())

    def min_regularizer_batch(self) -> int:
        """Appendix A.4: L_δ's pivots and L_OOD's starts per step should be at least 16·L_max / 10 000 (L_max
        counted in positions: 20 000 → 32 for the paper's text, 100 × 100 → 16 for its images), so that every
        position is trained often enough within the steps."""
        return max(1, math.ceil(16 * self.regularizer_volume() / 10_000))

    def _balance_regularizer_batches(self) -> None:
        """Raise the settings left at their defaults to A.4's floor; a value set below it is an error."""
        floor = self.min_regularizer_batch()
        for section, field in (("contrastive", "batch"), ("ood", "num_starts")):
            settings = getattr(self, section)
            value = getattr(settings, field)
            if value >= floor:
                continue
            if field in settings.model_fields_set:
                raise ValueError(
                    f"{section}.{field} = {value} is below Appendix A.4's floor for this space: at least "
                    f"16·L_max/10 000 = {floor} per step (L_max spans {self.regularizer_volume()} positions); "
                    f"set {section}.{field} >= {floor} or lower L_max"
                )
            object.__setattr__(self, section, settings.model_copy(update={field: floor}))

    def check_ood_reach(self) -> None:
        """Raise when no shift inside L_max reaches ``ood.min_shift`` (L_OOD could never draw a region)."""
        reach = samplers.ood_reach(self)  # type: ignore[arg-type]
        if self.ood.min_shift > reach:  # type: ignore[attr-defined]
            raise ValueError(
                f"ood.min_shift = {self.ood.min_shift} is not allowed for this space: it must be in [0, {reach:.4g}], "  # type: ignore[attr-defined]
                f"the largest shift L_max leaves room for (in training extents L); lower ood.min_shift or raise L_max"
            )

    def _check_regularizer_settings(self) -> None:
        """Settings the samplers could never meet are errors at load, not at the first training step.

        Only a ``min_shift`` the file sets: a space without room beyond L (L = L_max) is fine for methods
        without L_OOD, and SeqPE checks the default when it is built with β > 0."""
        if "min_shift" in self.ood.model_fields_set:  # type: ignore[attr-defined]
            self.check_ood_reach()

    def _check_width(self, pos: Tensor) -> None:
        width: int = self.width  # type: ignore[attr-defined]
        if pos.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"positions must be an integer tensor, got dtype {pos.dtype}")
        if pos.ndim == 0 or pos.shape[-1] != width:
            got = "a scalar" if pos.ndim == 0 else f"{pos.shape[-1]} coordinates per position"
            raise ValueError(f"{self._label()} expects positions with {width} coordinates, got {got} (shape {tuple(pos.shape)})")

    def _label(self) -> str:
        return "this space"


class GridSpace(_SpaceMixin, Frozen):
    """An ``n``-dimensional grid: 1-D text (n = 1), 2-D patches (n = 2), 3-D video (n = 3)…

    Positions are ``Int[Tensor, "*b n"]`` coordinates, row-major when enumerated. A coordinate
    is written with ``k`` digits in ``base``; the tokens of one position are the dims' digit
    blocks concatenated, then ``[CLS]`` (the paper's §3.2 and Fig. 1).
    """

    kind: Literal["grid"] = "grid"
    L: tuple[PositiveInt, ...]
    """Training extent per dim (D_train = ∏ [0, L_i)); a single int means 1-D."""
    L_max: tuple[PositiveInt, ...]
    """Maximum extent per dim the regularizers sample from."""
    base: int = 10
    """Number base of the digit tokens, ≥ 2."""
    k: PositiveInt | None = None
    """Digits per dim; derived from L_max unless given (base**k must reach L_max)."""
    distance: str = "euclidean"
    """Distance between positions, by registered name (see ``list_distances()``)."""
    contrastive: ContrastiveSettings = ContrastiveSettings()
    ood: OODSettings = OODSettings()
    shift: ShiftSettings = ShiftSettings()

    @field_validator("L", "L_max", mode="before")
    @classmethod
    def _scalar_is_1d(cls, value: Any) -> Any:
        return _as_tuple(value)

    @field_validator("base")
    @classmethod
    def _base_ok(cls, base: int) -> int:
        if base < 2:
            raise ValueError(f"base = {base} is not allowed; base must be an integer >= 2")
        return base

    @field_validator("distance")
    @classmethod
    def _distance_known(cls, name: str) -> str:
        get_distance(name)  # raises with the list of valid names
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "GridSpace":
        if len(self.L) != len(self.L_max):
            raise ValueError(f"L {self.L} and L_max {self.L_max} must have one entry per dim (got {len(self.L)} and {len(self.L_max)})")
        for i, (l, lm) in enumerate(zip(self.L, self.L_max)):
            if l > lm:
                raise ValueError(f"L[{i}] = {l} exceeds L_max[{i}] = {lm}; need L <= L_max")
        need = num_digits(max(self.L_max) - 1, self.base)
        if self.k is None:
            object.__setattr__(self, "k", need)
        elif self.k < need:
            raise ValueError(
                f"k = {self.k} digits in base {self.base} reach only {self.base**self.k - 1}, "
                f"but L_max = {max(self.L_max)} needs k >= {need}"
            )
        self.contrastive.window(self.ndim)  # validates the window's length
        self.ood.teachers(math.prod(self.L))
        self._balance_regularizer_batches()
        self._check_regularizer_settings()
        return self

    # -- layout ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.L)

    @property
    def width(self) -> int:
        return self.ndim

    @property
    def digits(self) -> int:
        assert self.k is not None  # resolved by the validator
        return self.k

    @property
    def seq_len(self) -> int:
        """Tokens per position: ``n·k`` digits + ``[CLS]``."""
        return self.ndim * self.digits + 1

    @property
    def cls_token(self) -> int:
        return self.base

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding T: the ``base`` digits and ``[CLS]``."""
        return self.base + 1

    @property
    def num_places(self) -> int:
        return self.ndim * self.digits

    @property
    def num_dims(self) -> int:
        """Rows of the dimension embedding D; 0 in 1-D, where D is fixed to zero (App. A.1)."""
        return self.ndim if self.ndim > 1 else 0

    @cached
    def place_ids(self) -> Int[Tensor, " s"]:
        """O index of each token slot, continuous across dims; [CLS] gets none."""
        return _int_tensor([*range(self.num_places), NONE_ID])

    @cached
    def dim_ids(self) -> Int[Tensor, " s"]:
        """D index of each token slot (none in 1-D and for [CLS])."""
        dims = [i for i in range(self.ndim) for _ in range(self.digits)] if self.ndim > 1 else [NONE_ID] * self.num_places
        return _int_tensor([*dims, NONE_ID])

    def _label(self) -> str:
        return f"this {self.ndim}-D grid space"

    # -- positions ------------------------------------------------------------------------
    def check(self, pos: Int[Tensor, "*b w"]) -> None:
        """Raise a ``ValueError`` naming the first coordinate that cannot be tokenized."""
        self._check_width(pos)
        bad = (pos < 0) | (pos >= self.base**self.digits)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            value, dim = int(pos[idx]), idx[-1]
            if value < 0:
                raise ValueError(f"coordinate {value} in dim {dim} is negative; coordinates must be >= 0")
            raise ValueError(
                f"coordinate {value} in dim {dim} needs {num_digits(value, self.base)} digits but k = {self.digits} "
                f"in base {self.base} allows at most {self.base**self.digits - 1}; raise k or L_max"
            )

    def tokenize(self, pos: Int[Tensor, "*b w"], *, check: bool = True) -> Int[Tensor, "*b s"]:
        """Digit tokens, each dim left-padded to ``k`` digits, dims concatenated, [CLS] last."""
        if check:
            self.check(pos)
        digits = to_digits(pos.long(), self.base, self.digits).flatten(-2)  # (*b, n*k)
        cls = digits.new_full((*digits.shape[:-1], 1), self.cls_token)
        return torch.cat([digits, cls], dim=-1)

    def detokenize(self, tokens: Int[Tensor, "*b s"]) -> Int[Tensor, "*b w"]:
        """Positions back from :meth:`tokenize`'s tokens."""
        _check_tokens(tokens, self.seq_len, self.cls_token, self.base)
        digits = tokens[..., :-1].unflatten(-1, (self.ndim, self.digits))
        return from_digits(digits, self.base)

    def positions(
        self, extent: Sequence[int] | int | None = None, start: Sequence[int] | None = None
    ) -> Int[Tensor, "m w"]:
        """All positions of a grid of ``extent`` (default ``L``) from ``start``, row-major."""
        extent = tuple(_as_tuple(extent)) if extent is not None else self.L
        start = tuple(start) if start is not None else (0,) * self.ndim
        if len(extent) != self.ndim or len(start) != self.ndim:
            raise ValueError(f"extent {extent} and start {start} need {self.ndim} entries for {self._label()}")
        axes = [torch.arange(s, s + e) for s, e in zip(start, extent)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.ndim)

    def delta(self, a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
        """The configured distance δ(a, b)."""
        return get_distance(self.distance)(a, b)

    # -- sampler tables (one group) -------------------------------------------------------
    @cached
    def box_lo(self) -> Int[Tensor, "g w"]:
        return torch.zeros(1, self.ndim, dtype=torch.int64, device=_CPU)

    @cached
    def box_train_hi(self) -> Int[Tensor, "g w"]:
        return _int_tensor(self.L)[None]

    @cached
    def box_max_hi(self) -> Int[Tensor, "g w"]:
        return _int_tensor(self.L_max)[None]

    @cached
    def box_window(self) -> Int[Tensor, "g w"]:
        return torch.minimum(_int_tensor(self.contrastive.window(self.ndim))[None], self.box_max_hi)

    @cached
    def box_digits(self) -> Int[Tensor, "g w"]:
        """Digits per coordinate; 0 marks a coordinate that is never perturbed."""
        return torch.full((1, self.ndim), self.digits, dtype=torch.int64, device=_CPU)

    def group_of(self, pos: Int[Tensor, "*b w"]) -> Int[Tensor, "*b"]:
        return torch.zeros(pos.shape[:-1], dtype=torch.int64, device=pos.device)


def _check_tokens(tokens: Tensor, seq_len: int, cls: int, base: int) -> None:
    if tokens.ndim == 0 or tokens.shape[-1] != seq_len:
        raise ValueError(f"tokens must have {seq_len} slots per position, got shape {tuple(tokens.shape)}")
    if bool((tokens[..., -1] != cls).any()):
        raise ValueError(f"the last token of every position must be [CLS] = {cls}")


# ---------------------------------------------------------------------------------------------
# Hybrid: interleaved modalities on one timeline
# ---------------------------------------------------------------------------------------------


class Modality(Frozen):
    """A named modality of a hybrid space and the grid its tokens live on."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    space: GridSpace


class Timeline(Frozen):
    L: PositiveInt
    """Training extent of the timeline."""
    L_max: PositiveInt
    """Maximum timeline extent the regularizers sample from."""


class Segment(NamedTuple):
    modality: str
    extent: tuple[int, ...]


class Layout(NamedTuple):
    """Per-token positions of an interleaved sequence and each token's modality id."""

    positions: Int[Tensor, "m w"]
    modality: Int[Tensor, " m"]


class HybridSpace(_SpaceMixin, Frozen):
    """Interleaved data: text runs and image/video grids in one sequence.

    **Representation.** Every token has the same width ``w = 2 + M`` (``M`` = the largest
    modality dimensionality above 1), so tokens of all modalities share one batch tensor:

    ``(modality id, t, x_1, …, x_M)``

    * ``t`` is the shared timeline. A 1-D modality (text) lives on it directly: its token at
      sequence index ``t`` has no local coordinates. An n-D modality (n ≥ 2) occupies one
      timeline step ``t`` (its anchor) and its tokens carry local coordinates ``x_1…x_n``.
    * Local coordinates a modality does not have are 0 and masked (:meth:`local_mask`); the
      tokenizer writes ``[PAD]`` tokens there, so the encoder sees a fixed-length sequence
      ``[MOD] t-digits x-digits… [CLS]`` and needs no attention mask.

    **Distance** (a true metric; ``gap`` > 0)::

        δ(p, q) = |t_p − t_q| + ρ(p, q)
        ρ(p, q) = δ_m(x_p, x_q)                           if both are modality m
                = δ_a(x_p, 0) + gap + δ_b(x_q, 0)          otherwise

    ρ is the path metric of the modality spaces glued to a hub at their origins, so δ is a
    metric; inside one segment it is the modality's own distance (text: |Δt|; one image:
    δ_image of the patch coordinates).
    """

    kind: Literal["hybrid"] = "hybrid"
    modalities: tuple[Modality, ...] = Field(min_length=1)
    """Ordered modalities; a token's modality id is its index here."""
    timeline: Timeline | None = None
    """Timeline extents; default: those of the 1-D modalities, which must then agree."""
    gap: float = Field(1.0, gt=0.0)
    """Distance added between tokens of different modalities."""
    contrastive: ContrastiveSettings = ContrastiveSettings()
    ood: OODSettings = OODSettings()
    shift: ShiftSettings = ShiftSettings()

    @model_validator(mode="after")
    def _consistent(self) -> "HybridSpace":
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names {names} must be unique")
        bases = {m.space.base for m in self.modalities}
        if len(bases) != 1:
            raise ValueError(f"all modalities must share one base, got bases {sorted(bases)}")
        one_d = [m for m in self.modalities if m.space.ndim == 1]
        for m in one_d:
            probe = torch.tensor([[0], [3], [10]], device=_CPU)
            got = m.space.delta(probe[:, None], probe[None])
            if not torch.equal(got, (probe[:, None] - probe[None]).abs().squeeze(-1).double()):
                raise ValueError(
                    f"modality {m.name!r} is 1-D and lives on the timeline, whose distance is |t - t'|; "
                    f"its distance {m.space.distance!r} differs (use euclidean, manhattan or chebyshev)"
                )
        for m in self.modalities:
            if m.space.ndim > 1 and not get_distance(m.space.distance).metric:
                raise ValueError(
                    f"modality {m.name!r} uses distance {m.space.distance!r}, which is not a metric; "
                    "the hybrid distance needs metric modality distances"
                )
        if self.timeline is None:
            extents = {(m.space.L[0], m.space.L_max[0]) for m in one_d}
            if len(extents) != 1:
                raise ValueError(
                    "timeline is required when the 1-D modalities do not fix it "
                    f"(1-D modalities give (L, L_max) = {sorted(extents) or 'nothing'})"
                )
            (l, lm), = extents
            object.__setattr__(self, "timeline", Timeline(L=l, L_max=lm))
        elif self.timeline.L > self.timeline.L_max:
            raise ValueError(f"timeline.L = {self.timeline.L} exceeds timeline.L_max = {self.timeline.L_max}")
        self.ood.teachers(int(self.box_train_hi.sub(self.box_lo).prod(-1).sum()))
        self._balance_regularizer_batches()
        self._check_regularizer_settings()
        return self

    # -- layout ---------------------------------------------------------------------------
    def regularizer_volume(self) -> int:
        """Positions the regularizers sample from: the modalities' own L_max boxes together."""
        return sum(m.space.regularizer_volume() for m in self.modalities)

    @property
    def base(self) -> int:
        return self.modalities[0].space.base

    @property
    def _timeline(self) -> Timeline:
        assert self.timeline is not None  # resolved by the validator
        return self.timeline

    @property
    def local_ndim(self) -> int:
        """M: the most local coordinates any modality has (1-D modalities have none)."""
        return max((m.space.ndim for m in self.modalities if m.space.ndim > 1), default=0)

    @property
    def width(self) -> int:
        return 2 + self.local_ndim

    @property
    def time_digits(self) -> int:
        return num_digits(self._timeline.L_max - 1, self.base)

    @property
    def local_digits(self) -> int:
        return max((m.space.digits for m in self.modalities if m.space.ndim > 1), default=0)

    @property
    def seq_len(self) -> int:
        """Tokens per position: [MOD], timeline digits, M local blocks, [CLS]."""
        return 1 + self.time_digits + self.local_ndim * self.local_digits + 1

    @property
    def cls_token(self) -> int:
        return self.base

    @property
    def pad_token(self) -> int:
        return self.base + 1

    def modality_token(self, modality: int) -> int:
        return self.base + 2 + modality

    @property
    def vocab_size(self) -> int:
        """Digits, [CLS], [PAD] and one token per modality."""
        return self.base + 2 + len(self.modalities)

    @property
    def num_places(self) -> int:
        return self.seq_len - 1

    @property
    def num_dims(self) -> int:
        return 1 + self.local_ndim

    @cached
    def place_ids(self) -> Int[Tensor, " s"]:
        return _int_tensor([*range(self.num_places), NONE_ID])

    @cached
    def dim_ids(self) -> Int[Tensor, " s"]:
        local = [1 + i for i in range(self.local_ndim) for _ in range(self.local_digits)]
        return _int_tensor([NONE_ID, *([0] * self.time_digits), *local, NONE_ID])

    def modality_id(self, name: str) -> int:
        for i, m in enumerate(self.modalities):
            if m.name == name:
                return i
        raise ValueError(f"unknown modality {name!r}; this space has {', '.join(m.name for m in self.modalities)}")

    @cached
    def _local_ndims(self) -> Int[Tensor, " g"]:
        return _int_tensor([m.space.ndim if m.space.ndim > 1 else 0 for m in self.modalities])

    def local_mask(self, modality: Int[Tensor, "*b"]) -> Bool[Tensor, "*b M"]:
        """Which local coordinates each token's modality actually has."""
        nd = self._local_ndims.to(modality.device)[modality]
        return torch.arange(self.local_ndim, device=modality.device) < nd.unsqueeze(-1)

    def _label(self) -> str:
        return f"this hybrid space ({', '.join(m.name for m in self.modalities)})"

    # -- positions ------------------------------------------------------------------------
    def check(self, pos: Int[Tensor, "*b w"]) -> None:
        """Raise a ``ValueError`` naming the first coordinate that cannot be tokenized."""
        self._check_width(pos)
        mod = pos[..., 0]
        if bool(((mod < 0) | (mod >= len(self.modalities))).any()):
            bad = int(mod[(mod < 0) | (mod >= len(self.modalities))][0])
            raise ValueError(f"modality id {bad} is not allowed; valid ids are 0..{len(self.modalities) - 1}")
        t = pos[..., 1]
        if bool((t < 0).any()):
            raise ValueError(f"timeline coordinate {int(t[t < 0][0])} is negative; coordinates must be >= 0")
        limit_t = self.base**self.time_digits
        if bool((t >= limit_t).any()):
            bad = int(t[t >= limit_t][0])
            raise ValueError(
                f"timeline coordinate {bad} needs more than {self.time_digits} digits in base {self.base} "
                f"(at most {limit_t - 1}); raise timeline.L_max"
            )
        x = pos[..., 2:]
        has = self.local_mask(mod.long())
        limits = _int_tensor([self.base ** m.space.digits for m in self.modalities]).to(pos.device)[mod.long()]
        bad = (has & ((x < 0) | (x >= limits.unsqueeze(-1)))) | (~has & (x != 0))
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            value, dim = int(x[idx]), idx[-1]
            m = self.modalities[int(mod[idx[:-1]])]
            if not bool(has[idx]):
                raise ValueError(f"local coordinate {dim} = {value} given to modality {m.name!r}, which has only {self._local_ndims[int(mod[idx[:-1]])]} local dims; it must be 0")
            if value < 0:
                raise ValueError(f"local coordinate {value} (dim {dim}, modality {m.name!r}) is negative; coordinates must be >= 0")
            raise ValueError(
                f"local coordinate {value} (dim {dim}, modality {m.name!r}) needs more than k = {m.space.digits} "
                f"digits in base {self.base} (at most {self.base**m.space.digits - 1}); raise that modality's k or L_max"
            )

    def tokenize(self, pos: Int[Tensor, "*b w"], *, check: bool = True) -> Int[Tensor, "*b s"]:
        """``[MOD] t-digits x-digits… [CLS]``, with ``[PAD]`` for local dims a modality lacks."""
        if check:
            self.check(pos)
        pos = pos.long()
        mod = pos[..., :1] + self.base + 2
        t = to_digits(pos[..., 1], self.base, self.time_digits)
        x = to_digits(pos[..., 2:], self.base, self.local_digits)  # (*b, M, K)
        x = torch.where(self.local_mask(pos[..., 0]).unsqueeze(-1), x, self.pad_token).flatten(-2)
        cls = torch.full_like(mod, self.cls_token)
        return torch.cat([mod, t, x, cls], dim=-1)

    def detokenize(self, tokens: Int[Tensor, "*b s"]) -> Int[Tensor, "*b w"]:
        """Positions back from :meth:`tokenize`'s tokens."""
        _check_tokens(tokens, self.seq_len, self.cls_token, self.base)
        mod = tokens[..., :1] - (self.base + 2)
        t = from_digits(tokens[..., 1 : 1 + self.time_digits], self.base).unsqueeze(-1)
        x = tokens[..., 1 + self.time_digits : -1].unflatten(-1, (self.local_ndim, self.local_digits))
        x = from_digits(torch.where(x == self.pad_token, 0, x), self.base)
        return torch.cat([mod, t, x], dim=-1)

    def delta(self, a: Int[Tensor, "*#b w"], b: Int[Tensor, "*#b w"]) -> Float[Tensor, "*#b"]:
        """The hybrid metric δ of the class docstring."""
        a, b = torch.broadcast_tensors(a, b)
        ma, mb = a[..., 0], b[..., 0]
        out = (a[..., 1] - b[..., 1]).abs().double()
        zero = torch.zeros_like(a[..., 2:])
        same = torch.zeros_like(out)
        cross = torch.full_like(out, self.gap)
        for g, m in enumerate(self.modalities):
            if m.space.ndim == 1:
                continue  # lives on the timeline: no local part
            n = m.space.ndim
            d = get_distance(m.space.distance)
            same = torch.where((ma == g) & (mb == g), d(a[..., 2 : 2 + n], b[..., 2 : 2 + n]), same)
            cross = cross + torch.where(ma == g, d(a[..., 2 : 2 + n], zero[..., :n]), 0.0)
            cross = cross + torch.where(mb == g, d(b[..., 2 : 2 + n], zero[..., :n]), 0.0)
        return out + torch.where(ma == mb, same, cross)

    def layout(self, segments: str | Sequence[tuple[str, int | Sequence[int]]], start: int = 0) -> Layout:
        """Explicit positions for a list of segments, e.g. ``"text:37, image:14x14, text:12"``.

        A 1-D segment of length ``n`` takes timeline steps ``t … t+n-1``; an n-D segment takes one
        step ``t`` and enumerates its grid row-major.
        """
        parsed = parse_segments(segments)
        rows: list[Tensor] = []
        t = start
        for seg in parsed:
            g = self.modality_id(seg.modality)
            space = self.modalities[g].space
            if len(seg.extent) != space.ndim:
                raise ValueError(
                    f"segment {seg.modality}:{'x'.join(map(str, seg.extent))} has {len(seg.extent)} dims, "
                    f"but modality {seg.modality!r} is {space.ndim}-D"
                )
            if space.ndim == 1:
                n = seg.extent[0]
                block = torch.zeros(n, self.width, dtype=torch.int64)
                block[:, 1] = torch.arange(t, t + n)
                t += n
            else:
                local = space.positions(seg.extent)
                block = torch.zeros(local.shape[0], self.width, dtype=torch.int64)
                block[:, 1] = t
                block[:, 2 : 2 + space.ndim] = local
                t += 1
            block[:, 0] = g
            rows.append(block)
        positions = torch.cat(rows) if rows else torch.zeros(0, self.width, dtype=torch.int64)
        self.check(positions)
        return Layout(positions=positions, modality=positions[:, 0].clone())

    # -- sampler tables (one group per modality) ------------------------------------------
    @cached
    def box_lo(self) -> Int[Tensor, "g w"]:
        lo = torch.zeros(len(self.modalities), self.width, dtype=torch.int64, device=_CPU)
        lo[:, 0] = torch.arange(len(self.modalities), device=_CPU)
        return lo

    def _hi(self, time: int, local: Any) -> Tensor:
        hi = torch.ones(len(self.modalities), self.width, dtype=torch.int64, device=_CPU)
        hi[:, 0] = torch.arange(1, len(self.modalities) + 1, device=_CPU)
        hi[:, 1] = time
        for g, m in enumerate(self.modalities):
            if m.space.ndim > 1:
                hi[g, 2 : 2 + m.space.ndim] = _int_tensor(local(m.space))
        return hi

    @cached
    def box_train_hi(self) -> Int[Tensor, "g w"]:
        return self._hi(self._timeline.L, lambda s: s.L)

    @cached
    def box_max_hi(self) -> Int[Tensor, "g w"]:
        return self._hi(self._timeline.L_max, lambda s: s.L_max)

    @cached
    def box_window(self) -> Int[Tensor, "g w"]:
        win = self._hi(self.contrastive.window(1)[0], lambda s: s.contrastive.window(s.ndim))
        win[:, 0] = 1
        return torch.minimum(win, self.box_max_hi - self.box_lo)

    @cached
    def box_digits(self) -> Int[Tensor, "g w"]:
        dig = torch.zeros(len(self.modalities), self.width, dtype=torch.int64, device=_CPU)
        dig[:, 1] = self.time_digits
        for g, m in enumerate(self.modalities):
            if m.space.ndim > 1:
                dig[g, 2 : 2 + m.space.ndim] = m.space.digits
        return dig

    def group_of(self, pos: Int[Tensor, "*b w"]) -> Int[Tensor, "*b"]:
        return pos[..., 0].long()


_SEGMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\d+(?:\s*x\s*\d+)*)\s*$")


def parse_segments(segments: str | Sequence[tuple[str, int | Sequence[int]]]) -> list[Segment]:
    """``"text:37, image:14x14"`` or ``[("text", 37), ("image", (14, 14))]`` → segments."""
    if isinstance(segments, str):
        out = []
        for part in filter(None, (p.strip() for p in segments.split(","))):
            match = _SEGMENT.match(part)
            if not match:
                raise ValueError(f"segment {part!r} is not NAME:EXTENT, e.g. 'text:37' or 'image:14x14'")
            out.append(Segment(match[1], tuple(int(e) for e in match[2].split("x"))))
    else:
        out = [Segment(name, (ext,) if isinstance(ext, int) else tuple(ext)) for name, ext in segments]
    for seg in out:
        if not seg.extent or any(not isinstance(e, int) or e < 1 for e in seg.extent):
            shown = "x".join(map(str, seg.extent))
            raise ValueError(f"segment {seg.modality}:{shown} has an empty extent; every extent must be >= 1")
    return out


PositionSpace = Annotated[GridSpace | HybridSpace, Field(discriminator="kind")]
"""Any position space; YAML picks one with ``kind: grid`` or ``kind: hybrid``."""

_ADAPTER: TypeAdapter[GridSpace | HybridSpace] = TypeAdapter(PositionSpace)


def read_yaml_mapping(source: str | Path, *, what: str, key: str) -> dict[str, Any]:
    """The mapping in a YAML file describing ``what`` (found by :func:`find_config_file`: the path, else the
    shipped configs); errors name the file and the ``key`` it needs."""
    path = find_config_file(source, what=what)
    data = read_yaml_file(path, what=what)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping with a {key!r} field, got {type(data).__name__}")
    return data


def load_space(source: str | Path | Mapping[str, Any]) -> GridSpace | HybridSpace:
    """A position space from a YAML file (relative to the working directory, else the shipped configs) or a
    dict; a missing ``kind`` means ``grid``. A mistake is one ValueError naming the field, the value and
    what is allowed."""
    if isinstance(source, (str, Path)):
        data = read_yaml_mapping(source, what="position-space", key="kind")
        return validated(_ADAPTER, {"kind": "grid", **data}, model=PositionSpace, source=source)
    if not isinstance(source, Mapping):
        raise ValueError(f"a position space is a YAML path or a mapping, got {type(source).__name__}")
    return validated(_ADAPTER, {"kind": "grid", **source}, model=PositionSpace)

"""Sampler settings shared by every kind of position space (pydantic, frozen, YAML-loadable)."""

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

Strategy = Literal["global", "global_hard", "local"]
STRATEGIES: tuple[Strategy, ...] = ("global", "global_hard", "local")


class Frozen(BaseModel):
    """The one base of every config section: frozen, unknown fields rejected, attribute docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ContrastiveSettings(Frozen):
    """Candidate sets for L_δ (the paper's Eq. 9 and Appendix A.2)."""

    batch: PositiveInt = 16
    """Pivots per training step."""
    num_candidates: int = Field(32, ge=2)
    """Candidates C per pivot."""
    mix: dict[Strategy, float] = Field(default_factory=lambda: {"global": 0.4, "local": 0.6})
    """Probability of each sampling strategy per pivot: global, global_hard, local."""
    hard_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    """Share of candidates that are lexical hard negatives in a global_hard set."""
    max_hard_ops: int = Field(3, ge=1)
    """Each hard negative applies 1…max_hard_ops random digit edits."""
    local_window: tuple[PositiveInt, ...] | PositiveInt | None = None
    """Local window size per dim; default max(256, 5C) in 1-D and 17 per dim otherwise."""

    @field_validator("mix")
    @classmethod
    def _mix_is_distribution(cls, mix: dict[str, float]) -> dict[str, float]:
        if any(p < 0 for p in mix.values()) or not math.isclose(sum(mix.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"mix {mix} must hold non-negative probabilities that sum to 1")
        return mix

    def window(self, ndim: int) -> tuple[int, ...]:
        if self.local_window is None:
            return (max(256, 5 * self.num_candidates),) if ndim == 1 else (17,) * ndim
        if isinstance(self.local_window, int):
            return (self.local_window,) * ndim
        if len(self.local_window) != ndim:
            raise ValueError(f"contrastive.local_window {self.local_window} needs {ndim} entries, one per dim")
        return self.local_window


class OODSettings(Frozen):
    """Teacher/student sets for L_OOD (Eq. 10, Appendix A.3)."""

    num_starts: PositiveInt = 16
    """Shifted regions D_z per step."""
    num_teachers: int | None = Field(None, ge=2)
    """Teacher positions m per region, drawn without replacement from D_train; default min(32, |D_train|)."""

    def teachers(self, train_size: int) -> int:
        if self.num_teachers is None:
            return min(32, train_size)
        if self.num_teachers > train_size:
            raise ValueError(f"ood.num_teachers = {self.num_teachers} exceeds |D_train| = {train_size}; it must be at most that")
        return self.num_teachers
    min_shift: float = Field(0.25, ge=0.0)
    """A shift z is kept when max_i z_i / L_i reaches this (1-D text: L/4; images: one full L)."""


class ShiftSettings(Frozen):
    """The random start shift of main-task positions (Appendix A.5)."""

    prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a training step uses shifted positions."""
    starts: PositiveInt = 16
    """Distinct start offsets per shifted step (at most one per row; row r takes start r mod this), as
    released: 16 shifted blocks shared by a batch of 32 (``pe_sampler.py``)."""
    pool: PositiveInt | None = 320
    """Shifted steps draw their starts from this many distinct offsets, drawn once per run (the released
    ``pe_random_shift_downsample``); None: fresh offsets every step."""

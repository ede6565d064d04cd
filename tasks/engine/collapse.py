"""SeqPE's collapse warning: its position channel still unused well after warmup."""

from seqpe_nd.encodings.seqpe import COLLAPSED_SPREAD

COLLAPSE_LOGS = 4
"""Consecutive logs with SeqPE's ``pe_spread`` below COLLAPSED_SPREAD before the warning: one low log can be
noise, four in a row is a trend."""

WATCH_FROM = 1 / 3
"""The watch starts after warmup and this share of the run. A healthy encoder starts at ~0.001 too (W_PE's
N(0, 0.02) init) and needs a few hundred steps to grow: in the GPT-2 smoke run (1500 steps, warmup 150,
benchmarks/results/collapse_signal.md) the healthy encoder reads 0.015-0.04 at steps 300-375 and passes 0.08 at
450; the collapsed one (encoder at the run's 2e-3) still reads 0.001-0.02 at 500."""


class CollapseWatch:
    """SeqPE's collapse warning: COLLAPSE_LOGS consecutive logs, after warmup and WATCH_FROM of the run, whose
    ``pe_spread`` is below COLLAPSED_SPREAD give one line, once per run. Reads the logging step's host floats only
    (no sync); a log without ``pe_spread`` (no SeqPE, or a shifted step) neither counts nor resets."""

    def __init__(self, warmup_steps: int, steps: int) -> None:
        self.start = max(warmup_steps, int(steps * WATCH_FROM))
        self.low: list[int] = []  # logged steps of the current run of low logs
        self.warned = False

    def update(self, step: int, means: dict[str, float]) -> str | None:
        """The warning, on the log of loop step ``step`` that completes the first run of low logs; else None."""
        spread = means.get("pe_spread")
        if self.warned or spread is None or step < self.start:
            return None
        if not spread < COLLAPSED_SPREAD:  # NaN is not a collapse
            self.low.clear()
            return None
        self.low.append(step + 1)
        if len(self.low) < COLLAPSE_LOGS:
            return None
        self.warned = True
        return (
            f"warning: SeqPE's position channel looks collapsed (pe_spread {spread:.3g} < {COLLAPSED_SPREAD} for "
            f"{len(self.low)} logs since step {self.low[0]}): attention ignores position; "
            "see README 'Training SeqPE so that it learns'"
        )

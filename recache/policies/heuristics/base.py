"""What a threshold heuristic is, and the measurements its calibration and decisions share.

A heuristic scheduler decides *while sampling*, from an indicator, whether a step runs the full network; its
threshold sets how often it does (methods section 6). Two kinds:

- ``OnlineHeuristic`` (TeaCache, FirstBlockCache, DiCache): decides per sample from the current features and
  fills the steps it skips itself; the realised budget differs from sample to sample.
- ``StaticHeuristic`` (fixed interval, MagCache): its decisions depend only on the step index and on constants
  calibrated once, so it is a ``Schedule`` and runs with any mechanism.

Decisions are per sample, as if each sample were generated alone with both CFG branches batched (as the
reference implementations do on FLUX): a sample's rows (its conditional and unconditional branch) compute or
skip together, so "k full passes" keeps its meaning. ``threshold = 0`` computes every step.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from recache.errors import RecacheError
from recache.schedule import Schedule


def relative_l1(a: torch.Tensor, b: torch.Tensor, branches: int) -> torch.Tensor:
    """``L1rel(a, b) = mean|a - b| / mean|b|`` per sample, over all rows of the sample (its CFG branches);
    rows are laid out branch-major, ``branch * samples + sample``."""
    num = (a - b).abs().flatten(1).sum(1).view(branches, -1).sum(0)
    den = b.abs().flatten(1).sum(1).view(branches, -1).sum(0)
    return num / den.clamp_min(1e-12)


class Heuristic:
    """A threshold heuristic; ``threshold`` is its only knob in calibration, the rest are fixed ``options``."""

    name: ClassVar[str]
    # Where bisection starts looking for a threshold (it widens the bracket if the target lies outside).
    bracket: ClassVar[tuple[float, float]] = (1e-3, 10.0)

    def __init__(self, threshold: float):
        finite = isinstance(threshold, int | float) and not isinstance(threshold, bool) and math.isfinite(threshold)
        self.check_option("threshold", threshold, finite and threshold >= 0, "a finite number >= 0")
        self.threshold = float(threshold)

    def check_option(self, option: str, value, ok: bool, allowed: str) -> None:
        """Unless ``ok``, a one-line error naming this heuristic's bad ``option`` value and what is ``allowed``."""
        if not ok:
            raise RecacheError(f"{self.name} {option} {value!r} is not allowed: use {allowed}")

    def check_retention(self, retention: float) -> None:
        self.check_option("retention", retention, 0.0 <= retention < 1.0, "a fraction of the steps in [0, 1)")

    def options(self) -> dict:
        """Everything besides the threshold needed to rebuild this heuristic (JSON-serialisable)."""
        return {}

    @classmethod
    def fit(cls, pipe, classes: torch.Tensor, seeds: list[int], options: dict) -> dict:
        """Constants fitted on the model from uncached calibration runs (TeaCache's polynomial, MagCache's
        ratios), merged into ``options``; most heuristics have none."""
        return options


class StaticHeuristic(Heuristic):
    def schedule(self, T: int) -> Schedule:
        raise NotImplementedError


class OnlineHeuristic(Heuristic):
    """Subclasses implement ``reset`` and ``__call__(step, h, c, blocks) -> (h_out, compute)``.

    ``fill`` names what fills skipped steps; ``probe_depth`` is the number of blocks run at every skipped step to
    decide (their cost is reported beside the budget, as pass equivalents)."""

    fill: ClassVar[str]
    probe_depth: ClassVar[int] = 0

    def reset(self, rows: int, branches: int, steps: int) -> None:
        self.rows, self.branches, self.total_steps = rows, branches, steps
        self.samples = rows // branches

    def per_row(self, decision: torch.Tensor) -> torch.Tensor:
        """A per-sample decision, repeated for each CFG branch's rows."""
        return decision.repeat(self.branches)

    def always_computes(self, step: int) -> bool:
        """The first step has nothing cached; the last one is computed, as TeaCache and DiCache do."""
        return step == 0 or step == self.total_steps - 1

"""Fixed interval (FORA, ToCa, TaylorSeer's native schedule): compute every ``N``-th step, ``S = {0, N, 2N, ...}``.

The threshold is the interval ``N``, so the reachable budgets are ``ceil(T / N)``; calibration picks the
closest (k = 14 of 50, for one, lies between N = 4 -> 13 and N = 3 -> 17).
"""

from __future__ import annotations

from recache.errors import RecacheError
from recache.policies.heuristics.base import StaticHeuristic
from recache.schedule import Schedule


class FixedInterval(StaticHeuristic):
    name = "fixed-interval"
    integer = True

    def __init__(self, threshold: float):
        super().__init__(threshold)
        if self.threshold < 1 or self.threshold != int(self.threshold):
            raise RecacheError(f"fixed-interval needs a whole interval N >= 1, got {threshold!r}")

    def schedule(self, T: int) -> Schedule:
        return Schedule.from_steps(T, range(0, T, int(self.threshold)), source=self.name, interval=int(self.threshold))

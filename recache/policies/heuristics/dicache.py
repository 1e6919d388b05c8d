"""DiCache (Bu et al., ICLR 2026; arXiv 2508.17356): a shallow probe decides, and aligns the reused residuals.

Every step runs the first ``probe_depth`` blocks, ``p_i``. After the retention prefix the error
``delta_y = L1rel(p_i, p_{i-1})`` (mode ``delta_y``) or ``|delta_y - L1rel(h_i, h_{i-1})|`` (mode ``delta_minus``)
accumulates; skip while it stays below the threshold, else run the remaining blocks from the probe and reset.
A skipped step forecasts the stack residual from the last two computed steps ``r_-1, r_-2`` with the probe
residuals ``q = p - h`` there: ``h + r_-2 + gamma (r_-1 - r_-2)``,
``gamma = clip(mean|(p_i - h_i) - q_-2| / mean|q_-1 - q_-2|, 1, 1.5)``; with one computed step, plain reuse.
``p_{i-1}`` is the previous step's probe (computed or not): our reading of the method, whose code is not
reproduced here. The last step always computes.
"""

from __future__ import annotations

import torch

from recache.errors import RecacheError
from recache.mechanisms.base import RowState, by_rows, row_split, run_blocks
from recache.policies.heuristics.base import OnlineHeuristic, relative_l1

MODES = ("delta_minus", "delta_y")


class DiCache(OnlineHeuristic):
    name = "dicache"
    fill = "probe-aligned reuse"
    bracket = (1e-3, 3.0)

    def __init__(self, threshold: float, probe_depth: int = 1, mode: str = "delta_minus", retention: float = 0.0):
        super().__init__(threshold)
        self.check_option("mode", mode, mode in MODES, f"one of {', '.join(MODES)}")
        self.check_option("probe_depth", probe_depth, isinstance(probe_depth, int) and probe_depth >= 1,
                          "a whole number of blocks >= 1")
        self.check_retention(retention)
        self.probe_depth, self.mode, self.retention = probe_depth, mode, float(retention)

    def options(self) -> dict:
        return {"probe_depth": self.probe_depth, "mode": self.mode, "retention": self.retention}

    def reset(self, rows, branches, steps):
        super().reset(rows, branches, steps)
        self.accumulated = torch.zeros(self.samples)
        self.previous_probe = self.previous_input = None
        self.residuals = [RowState(rows), RowState(rows)]  # r_-1, r_-2
        self.probe_residuals = [RowState(rows), RowState(rows)]  # q_-1, q_-2

    def __call__(self, step, h, c, blocks):
        if self.probe_depth >= len(blocks):
            raise RecacheError(f"dicache probe_depth {self.probe_depth} must be below the model's {len(blocks)} blocks")
        probe = run_blocks(blocks[: self.probe_depth], h, c)
        if self.previous_probe is None or self.always_computes(step) or step < round(self.retention * self.total_steps):
            compute = torch.ones(self.samples, dtype=torch.bool)
            self.accumulated.zero_()
        else:
            error = relative_l1(probe, self.previous_probe, self.branches)
            if self.mode == "delta_minus":
                error = (error - relative_l1(h, self.previous_input, self.branches)).abs()
            self.accumulated += error
            compute = self.accumulated >= self.threshold
            self.accumulated[compute] = 0.0
        self.previous_probe, self.previous_input = probe, h
        compute = self.per_row(compute)
        out = by_rows(row_split(compute), h, lambda rows: self._computed(rows, h, probe, c, blocks),
                      lambda rows: self._aligned(rows, h, probe))
        return out, compute

    def _computed(self, rows, h, probe, c, blocks):
        out = run_blocks(blocks[self.probe_depth:], probe[rows], c[rows])
        for states, new in ((self.residuals, out - h[rows]), (self.probe_residuals, probe[rows] - h[rows])):
            older = states[0].read(rows) if states[0].value is not None else new  # first computed step: both slots
            states[1].write(rows, older)
            states[0].write(rows, new)
        return out

    def _aligned(self, rows, h, probe):
        r1, r2 = (s.read(rows) for s in self.residuals)
        q1, q2 = (s.read(rows) for s in self.probe_residuals)
        spread = (q1 - q2).abs().flatten(1).mean(1).clamp_min(1e-12)
        gamma = ((probe[rows] - h[rows] - q2).abs().flatten(1).mean(1) / spread).clamp(1.0, 1.5)
        return h[rows] + r2 + gamma.view(-1, *[1] * (h.dim() - 1)) * (r1 - r2)

"""TeaCache (Liu et al. 2025, CVPR; arXiv 2411.19108): skip while the rescaled change of the modulated input is small.

Indicator ``I_i`` = the timestep-modulated input of block 0; ``d_i = L1rel(I_i, I_{i-1})``, rescaled by a degree-4
polynomial ``f`` fitted on the model (``np.polyfit`` of the output change against ``d`` on uncached runs, as the
reference does for each new model), accumulated: ``A <- A + f(d_i)``; skip while ``A < threshold``, else compute
and reset ``A``. First and last steps compute. Skipped steps are filled by a feature mechanism (``reuse``,
TeaCache's own, by default).
"""

from __future__ import annotations

import numpy as np
import torch

from recache.errors import RecacheError
from recache.mechanisms import get_mechanism
from recache.mechanisms.base import row_split
from recache.policies.heuristics.base import OnlineHeuristic, relative_l1
from recache.sampling.online import sample_online

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)  # f(d) = d, before fitting


class TeaCache(OnlineHeuristic):
    name = "teacache"
    bracket = (1e-3, 3.0)

    def __init__(self, threshold: float, coefficients: list[float] | tuple[float, ...] = IDENTITY,
                 mechanism: str = "reuse"):
        super().__init__(threshold)
        if len(coefficients) != 5 or not all(np.isfinite(coefficients)):
            raise RecacheError("teacache needs 5 finite polynomial coefficients (highest power first), "
                               f"got {list(coefficients)}")
        self.coefficients = [float(v) for v in coefficients]
        self.mechanism = get_mechanism(mechanism)
        if not self.mechanism.fills_block_stack:
            raise RecacheError(f"teacache fills skipped steps with a feature mechanism, not {mechanism!r}")
        self.fill = mechanism
        self.trace: list[torch.Tensor] | None = None  # per-step d_i when recording for the fit

    def options(self) -> dict:
        return {"coefficients": self.coefficients, "mechanism": self.fill}

    def reset(self, rows, branches, steps):
        super().reset(rows, branches, steps)
        self.mechanism.reset(rows, steps)
        self.accumulated = torch.zeros(self.samples)
        self.previous = None

    def __call__(self, step, h, c, blocks):
        indicator = blocks[0].modulated_input(h, c)
        if self.previous is None or self.always_computes(step):
            compute = torch.ones(self.samples, dtype=torch.bool)
            self.accumulated.zero_()
        else:
            distance = relative_l1(indicator, self.previous, self.branches)
            if self.trace is not None:
                self.trace.append(distance)
            self.accumulated += torch.from_numpy(np.polyval(self.coefficients, distance.double().numpy())).float()
            compute = self.accumulated >= self.threshold
            self.accumulated[compute] = 0.0
        self.previous = indicator
        compute = self.per_row(compute)
        return self.mechanism.blocks_or_cache(step, row_split(compute), h, c, blocks), compute

    @classmethod
    def fit(cls, pipe, classes, seeds, options):
        """Fit ``f`` on uncached runs: pairs (indicator change, change of the guided velocity) at steps 1..T-1."""
        options = dict(options)
        if "coefficients" in options:
            return options
        probe = cls(0.0, mechanism=options.get("mechanism", "reuse"))
        if not hasattr(pipe.model.blocks[0], "modulated_input"):
            raise RecacheError("teacache needs the first block's modulated input (blocks[0].modulated_input)")
        probe.trace, velocities = [], []
        with torch.no_grad():
            sample_online(pipe.model, pipe.noise(seeds), pipe.sigmas, classes, probe, pipe.guidance,
                          callback=lambda info: velocities.append(info["velocity"]))
        x = torch.cat(probe.trace[: len(velocities) - 2])  # steps 1..T-2 (the last step always computes)
        y = torch.cat([relative_l1(velocities[i], velocities[i - 1], 1) for i in range(1, len(velocities) - 1)])
        options["coefficients"] = [float(v) for v in np.polyfit(x.double().numpy(), y.double().numpy(), 4)]
        return options

"""MagCache (Ma et al. 2025, NeurIPS; diffusers ``MagCacheConfig``): skip while the accumulated magnitude drift is
small.

Calibration on uncached runs: ``gamma_i = mean over tokens of ||r_i||_2 / ||r_{i-1}||_2``, ``r`` the block-stack
residual (averaged here over the calibration pairs and both CFG branches: one schedule serves both, our choice).
Decisions, after the first ``round(retention * T)`` steps: ``R <- R gamma_i, n <- n + 1, E <- E + |1 - R|``; skip
while ``E <= threshold and n <= max_skip``, else compute and reset ``R = 1, E = 0, n = 0``. They depend on the
step index only, so MagCache is a fixed schedule and runs with any mechanism (``reuse`` is its own).
Defaults: the official FLUX retention 0.1; ``max_skip`` 10 instead of 5 so that k = 10 of 50 is reachable.
"""

from __future__ import annotations

import math

import torch

from recache.errors import RecacheError
from recache.policies.heuristics.base import StaticHeuristic
from recache.schedule import Schedule


class MagCache(StaticHeuristic):
    name = "magcache"
    bracket = (1e-3, 10.0)

    def __init__(self, threshold: float, ratios: list[float] | None = None, max_skip: int = 10, retention: float = 0.1):
        super().__init__(threshold)
        if ratios is not None and (len(ratios) < 2 or not all(math.isfinite(r) and r > 0 for r in ratios)):
            raise RecacheError("magcache ratios must be at least two finite positive numbers")
        self.check_option("max_skip", max_skip, isinstance(max_skip, int) and max_skip >= 1, "a whole number >= 1")
        self.check_retention(retention)
        self.ratios, self.max_skip, self.retention = ratios, max_skip, float(retention)

    def options(self) -> dict:
        return {"ratios": self.ratios, "max_skip": self.max_skip, "retention": self.retention}

    def schedule(self, T: int) -> Schedule:
        if self.ratios is None:
            raise RecacheError("magcache has no magnitude ratios: calibrate it first "
                               "(recache calibrate --heuristic magcache)")
        n_ratios = len(self.ratios)
        gamma = [self.ratios[min(n_ratios - 1, round(i * (n_ratios - 1) / max(T - 1, 1)))] for i in range(T)]  # nearest
        mask, ratio, error, skipped = [], 1.0, 0.0, 0
        for i in range(T):
            if i == 0 or i < round(self.retention * T):
                mask.append(True)
                continue
            ratio, skipped = ratio * gamma[i], skipped + 1
            error += abs(1.0 - ratio)
            skip = error <= self.threshold and skipped <= self.max_skip
            mask.append(not skip)
            if not skip:
                ratio, error, skipped = 1.0, 0.0, 0
        return Schedule(tuple(mask), {"source": self.name, "threshold": self.threshold})

    @classmethod
    def fit(cls, pipe, classes, seeds, options):
        options = dict(options)
        if options.get("ratios") is None:
            options["ratios"] = magnitude_ratios(pipe, classes, seeds)
        return options


def magnitude_ratios(pipe, classes: torch.Tensor, seeds: list[int]) -> list[float]:
    """``gamma_i`` of MagCache from one uncached run over the pairs (``gamma_0 = 1``)."""
    blocks, inputs, outputs = pipe.model.blocks, [], []
    hooks = [blocks[0].register_forward_hook(lambda m, args, out: inputs.append(args[0])),
             blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out))]
    try:
        pipe(classes, seeds)
    finally:
        for hook in hooks:
            hook.remove()
    norms = [(out - inp).norm(dim=-1) for inp, out in zip(inputs, outputs, strict=True)]  # (rows, tokens) per step
    return [1.0] + [float((norms[i] / norms[i - 1].clamp_min(1e-12)).mean()) for i in range(1, len(norms))]

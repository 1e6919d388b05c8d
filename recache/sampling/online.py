"""Sampling with an online heuristic (TeaCache, FirstBlockCache, DiCache): it decides each step while sampling.

``HeuristicVelocity`` has the model's call signature, like ``CachedVelocity``, so the Euler sampler and CFG drive
it unchanged; the heuristic sees the embedded tokens and this step's conditioning and returns the block stack's
output and which rows computed.
"""

from __future__ import annotations

import torch

from recache.sampling.cached import step_conditions
from recache.sampling.euler import GuidedVelocity, sample_euler


class HeuristicVelocity:
    def __init__(self, model, sigmas: torch.Tensor, heuristic, branches: int):
        self.model, self.heuristic, self.branches = model, heuristic, branches
        self.sigmas = sigmas[:-1].reshape(-1, 1)
        self.step, self.computed = 0, []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.step == 0:
            self.heuristic.reset(x.shape[0], self.branches, len(self.sigmas))
            self.conditions = step_conditions(self.model, self.sigmas, cond)
        c = self.conditions[self.step]
        h, compute = self.heuristic(self.step, self.model.embed(x), c, self.model.blocks)
        self.computed.append(compute)
        self.step += 1
        return self.model.final(h, c)

    def masks(self, samples: int) -> torch.Tensor:
        """(samples, T) booleans: which steps each sample computed (its first branch's rows)."""
        return torch.stack(self.computed, dim=1)[:samples]


def sample_online(model, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor, heuristic,
                  guidance: float = 1.0, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples and each sample's compute mask (samples, T); its row sums are the realised full passes."""
    cached = HeuristicVelocity(model, sigmas, heuristic, branches=1 if float(guidance) == 1.0 else 2)
    out = sample_euler(GuidedVelocity(cached, guidance, model.null_class), noise, sigmas, cond, callback=callback)
    return out, cached.masks(noise.shape[0])

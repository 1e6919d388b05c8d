"""Cached sampling: run a compute schedule with a mechanism, one schedule per batch row.

``CachedVelocity`` wraps a model in the adapter protocol and has the same call signature as the model, so the
ordinary Euler sampler (and CFG) drive it unchanged. At step ``i`` the rows whose mask computes run the block
stack together; the other rows are filled by the mechanism. With every row computing, the computation is
exactly the model's own forward pass.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import CacheableModel, Mechanism, Uncached, row_split
from recache.sampling.euler import GuidedVelocity, sample_euler
from recache.schedule import Schedule


class CachedVelocity:
    """``v(x, sigma, cond)`` following ``masks`` (rows x T booleans, 1 = compute) with ``mechanism``.

    Called once per sampler step, at step ``i`` with ``sigmas[i]``; ``reset()`` before each sampling call. A batch
    of ``m * rows`` rows (CFG doubles the batch) uses the masks tiled ``m`` times. ``full_passes`` counts, per row,
    the steps on which the block stack really ran. The conditioning of all T steps is computed in one batch on
    the first call (it does not depend on ``x``). Without ``masks`` every step computes (``Uncached``): that is the
    uncached sampler, on the same code path, so a full budget reproduces it bit for bit.
    """

    def __init__(self, model: CacheableModel, sigmas: torch.Tensor, masks: torch.Tensor | None = None,
                 mechanism: Mechanism | None = None):
        T = len(sigmas) - 1
        masks = torch.ones(1, T, dtype=torch.bool) if masks is None else masks.bool()
        if masks.shape[1] != T:
            raise ValueError(f"masks have T={masks.shape[1]} steps but the sigma grid has {T}")
        if mechanism is None and not masks.all():
            raise ValueError("a schedule with cached steps needs a mechanism")
        self.model, self.masks, self.mechanism = model, masks, mechanism or Uncached()
        self.sigmas = sigmas[:T].reshape(-1, 1)
        self.reset()

    def reset(self) -> None:
        self.step, self.full_passes = 0, None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.step == 0:
            self._start(x.shape[0], cond)
        elif self.step >= len(self._splits):
            raise RuntimeError(f"called for step {self.step} but the masks have T={len(self._splits)}; "
                               "call reset() between samplings")
        v = self.mechanism.step_output(self.model, self.step, self._splits[self.step], x, self._conditions[self.step])
        self.step += 1
        return v

    def _start(self, rows: int, cond: torch.Tensor) -> None:
        """Per-call setup: fresh mechanism state, each step's split of the rows and every step's conditioning."""
        T = self.masks.shape[1]
        if rows % self.masks.shape[0]:
            raise ValueError(f"batch of {rows} rows does not tile {self.masks.shape[0]} masks")
        self.mechanism.reset(rows, T)
        self.full_passes = self.mechanism.full_passes
        self._splits = [row_split(compute) for compute in self.masks.repeat(rows // self.masks.shape[0], 1).t()]
        self._conditions = step_conditions(self.model, self.sigmas, cond).unbind(0)  # T x (rows, ...)


def step_conditions(model: CacheableModel, sigmas: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The conditioning of every step for every row, (len(sigmas), rows, ...), in one batch. It depends on
    (sigma, cond) alone, so it is computed once per distinct condition and spread to the rows."""
    distinct, index = torch.unique(cond, dim=0, return_inverse=True)
    return model.condition(sigmas.reshape(-1, 1), distinct)[:, index]


def masks_of(schedules: list[Schedule] | Schedule) -> torch.Tensor:
    schedules = [schedules] if isinstance(schedules, Schedule) else schedules
    if len({s.T for s in schedules}) != 1:
        raise ValueError("all schedules of one call must have the same T")
    return torch.stack([s.as_tensor() for s in schedules])


def sample_cached(model, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                  masks: torch.Tensor | None = None, mechanism: Mechanism | None = None, guidance: float = 1.0,
                  null_cond: int | None = None, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with per-row compute masks (none: the uncached sampler); returns the samples and each row's
    realised number of full passes. Differentiable in ``sigmas`` under ``torch.enable_grad()`` (mechanism state is
    detached, as in BudCache's alignment); wrap it in ``torch.no_grad()`` to only sample."""
    cached = CachedVelocity(model, sigmas, masks, mechanism)
    velocity = GuidedVelocity(cached, guidance, null_cond if null_cond is not None else model.null_class)
    out = sample_euler(velocity, noise, sigmas, cond, callback=callback)
    return out, cached.full_passes[: noise.shape[0]]

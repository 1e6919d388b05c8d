"""Batched rollouts on per-row clocks: many schedules in one call, each row advancing through its own schedule.

A synchronous batch runs step ``i`` for every row at once, so G schedules that compute on different steps run
the blocks at most steps, each time on a few rows. Here the j-th full pass of every row runs in one batched call,
each row at its own step (its j-th computed step); between two full passes the rows take their cached steps
together, one step each, every row at its own step. G schedules of budget k then cost k batched full passes, whichever
steps they pick. Every row does the arithmetic of a separate run (the same conditioning, mechanism state, CFG and Euler
update), so the results equal separate runs up to the rounding of batched matrix products.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import CacheableModel, Mechanism
from recache.sampling.cached import step_conditions
from recache.sampling.euler import combine_cfg
from recache.sampling.finite import FiniteWatch


def row_plan(masks: torch.Tensor) -> list[tuple[str, list[int], list[int]]]:
    """The order of work on per-row clocks: ``(kind, samples, steps)`` entries, ``kind`` "cached" or "full", one
    step per sample. Before the rows' j-th full passes, every row takes the cached steps up to its own j-th computed
    step, all rows one step each per entry; then the j-th full passes of all rows that have one run together."""
    T = masks.shape[1]
    computed = [m.nonzero().squeeze(1).tolist() for m in masks]
    position, plan = [0] * len(computed), []
    for j in range(max(len(c) for c in computed) + 1):
        target = [c[j] if j < len(c) else T for c in computed]
        gaps = [t - p for p, t in zip(position, target, strict=True)]
        for tick in range(max(gaps)):
            rows = [s for s, gap in enumerate(gaps) if tick < gap]
            plan.append(("cached", rows, [position[s] + tick for s in rows]))
        rows = [s for s, c in enumerate(computed) if j < len(c)]
        if rows:
            plan.append(("full", rows, [target[s] for s in rows]))
        position = [t + 1 for t in target]
    return plan


def _indices(entry, samples: int, branches: int, dts: torch.Tensor):
    """A plan entry as indices: kind; its samples and their rows in the mechanism's state (the CFG branches of sample
    ``s`` are rows ``s`` and ``s + samples``), slices when all samples take part; the rows as a tensor (to gather
    conditioning); one step per row; each sample's Euler step size (``dts`` is shaped to broadcast over a sample)."""
    kind, chosen, steps = entry
    at, idx = torch.tensor(steps), torch.tensor(chosen)
    rows = torch.cat([idx + b * samples for b in range(branches)])
    everyone = len(chosen) == samples
    return kind, slice(None) if everyone else idx, slice(None) if everyone else rows, rows, at.repeat(branches), dts[at]


@torch.no_grad()
def sample_rollouts(model: CacheableModel, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                    masks: torch.Tensor, mechanism: Mechanism, guidance: float = 1.0,
                    null_cond: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_cached`` for a batch whose rows follow different masks (one per row of ``noise``): the samples and
    each row's realised number of full passes, counted where the blocks run."""
    S, T = masks.shape
    if noise.shape[0] != S or len(sigmas) != T + 1:
        raise ValueError(f"{noise.shape[0]} noise rows and {len(sigmas) - 1} sigma steps for masks of shape "
                         f"{tuple(masks.shape)}")
    branches = 1 if float(guidance) == 1.0 else 2
    null = null_cond if null_cond is not None else model.null_class
    conds = cond if branches == 1 else torch.cat([cond, torch.full_like(cond, null)])
    conditions = step_conditions(model, sigmas[:T], conds)  # (T, rows, ...)
    dts = (sigmas[1:] - sigmas[:-1]).view(-1, *[1] * (noise.dim() - 1))
    mechanism.reset(S * branches, T)
    x = noise.clone()
    watch = FiniteWatch(S, T, x.device)
    for kind, idx, rows, row_ids, step, dt in [_indices(entry, S, branches, dts) for entry in row_plan(masks.bool())]:
        x_in = x[idx]
        x_rows = x_in if branches == 1 else torch.cat([x_in, x_in])
        v = mechanism.step_output(model, step, kind == "full", x_rows, conditions[step, row_ids], rows)
        if branches == 2:
            v = combine_cfg(v, float(guidance))
        x_out = torch.addcmul(x_in, dt, v)
        x[idx] = x_out
        watch.update(x_out, step[: len(x_in)], idx)
    watch.check()
    return x, mechanism.full_passes[:S]

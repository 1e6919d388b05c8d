"""Batched rollouts on per-row clocks: many schedules in one call, each row advancing through its own schedule.

A synchronous batch runs step ``i`` for every row at once, so G schedules that compute on different steps run
the blocks at most steps, each time on a few rows. Here the j-th full pass of every row runs in one batched call,
each row at its own step (its j-th computed step); between two full passes the rows take their cached steps,
those at the same step index together. G schedules of budget k then cost k batched full passes, whichever steps
they pick. Every row does the arithmetic of a separate run (the same conditioning, mechanism state, CFG and Euler
update), so the results equal separate runs up to the rounding of batched matrix products.
"""

from __future__ import annotations

import torch

from recache.mechanisms.base import CacheableModel, Mechanism, run_blocks


def row_plan(masks: torch.Tensor) -> list[tuple[str, list[int], int | list[int]]]:
    """The order of work for per-row clocks: ``("cached", samples, step)`` and ``("full", samples, steps)`` entries.

    Before each row's j-th computed step, every row still short of its own next computed step takes its cached
    steps, grouped by step index; then the j-th full passes of all rows that have one run together."""
    T = masks.shape[1]
    computed = [m.nonzero().squeeze(1).tolist() for m in masks]
    position, plan = [0] * len(computed), []
    for j in range(max(len(c) for c in computed) + 1):
        target = [c[j] if j < len(c) else T for c in computed]
        for i in range(min(position), max(target)):
            rows = [s for s, (p, t) in enumerate(zip(position, target, strict=True)) if p <= i < t]
            if rows:
                plan.append(("cached", rows, i))
        position = list(target)
        rows = [s for s, c in enumerate(computed) if j < len(c)]
        if rows:
            plan.append(("full", rows, [target[s] for s in rows]))
            for s in rows:
                position[s] += 1
    return plan


@torch.no_grad()
def sample_rollouts(model: CacheableModel, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor, masks: torch.Tensor,
                    mechanism: Mechanism, guidance: float = 1.0, null_cond: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_cached`` for a batch whose rows follow different masks (one per row of ``noise``): the samples and
    each row's realised number of full passes, counted where the blocks run."""
    S, T = masks.shape
    if noise.shape[0] != S or len(sigmas) != T + 1:
        raise ValueError(f"{noise.shape[0]} noise rows and {len(sigmas) - 1} sigma steps for masks of shape {tuple(masks.shape)}")
    branches = 1 if float(guidance) == 1.0 else 2
    null = null_cond if null_cond is not None else model.null_class
    conds = cond if branches == 1 else torch.cat([cond, torch.full_like(cond, null)])
    distinct, index = torch.unique(conds, dim=0, return_inverse=True)
    conditions = model.condition(sigmas[:T].reshape(-1, 1), distinct)[:, index]  # (T, rows, ...)
    dts = sigmas[1:] - sigmas[:-1]
    mechanism.reset(S * branches, T)
    x, passes = noise.clone(), torch.zeros(S, dtype=torch.long)
    for kind, samples, steps in row_plan(masks.bool()):
        idx = torch.tensor(samples)
        rows = idx if branches == 1 else torch.cat([idx, idx + S])
        x_in = x[idx]
        h_x = x_in if branches == 1 else torch.cat([x_in, x_in])
        if kind == "cached":
            c = conditions[steps, rows]
            if mechanism.reuses_output:
                v = mechanism.cached_output(rows)
            else:
                v = model.final(mechanism.cached_pass(steps, rows, model.embed(h_x), c, model.blocks), c)
        else:
            step = torch.tensor(steps).repeat(branches)
            c = conditions[step, rows]
            if mechanism.reuses_output:
                v = model.final(run_blocks(model.blocks, model.embed(h_x), c), c)
                mechanism.record_output(rows, v)
            else:
                v = model.final(mechanism.full_pass(step, rows, model.embed(h_x), c, model.blocks), c)
            passes[idx] += 1
        if branches == 2:
            v_cond, v_uncond = v.chunk(2)
            v = torch.lerp(v_uncond, v_cond, float(guidance))
        if kind == "cached":
            x[idx] = torch.add(x_in, v, alpha=float(dts[steps]))
        else:
            x[idx] = x_in + dts[torch.tensor(steps)].view(-1, *[1] * (x.dim() - 1)) * v
    return x, passes

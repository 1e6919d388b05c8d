"""BudCache stage 2, cache-aware schedule alignment (arXiv 2606.13496; the authors' public code).

For a fixed compute mask, learn the T + 1 sigmas of the cached Euler sampler so that its final output matches the
uncached teacher on the base grid, by gradient descent through the cached sampler (the network is frozen; the
mechanism's stored state is detached, as in the reference). The grid is monotone by construction:
``sigma_i = sigma_0 - (sigma_0 - sigma_T) cumsum(softmax(theta))_{i-1}``, endpoints pinned, ``theta`` initialised
to the logarithm of the base grid's gaps (the reference's Wan parametrisation). Our choices: Adam on the full
calibration batch (the reference: AdamW, 1 epoch over 100 prompts, about 2 updates), and the base grid is kept
when alignment does not lower the calibration loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm, trange

from recache.errors import RecacheError
from recache.mechanisms import get_mechanism
from recache.protocol import calibration_pairs
from recache.sampling.cached import sample_cached
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import fit_shift
from recache.schedule import Schedule

SHIFT_FACTORS = tuple(2 ** (i / 4) for i in range(-8, 9))  # the shifts a pipeline's alignment tries: s0 / 4 .. 4 s0
ALIGNED_KEYS = ("aligned_sigmas", "aligned_shift", "aligned", "align", "align_loss", "base_loss")


def unaligned(schedule: Schedule) -> Schedule:
    """The schedule without what an earlier alignment wrote: a new alignment starts from the base grid."""
    return Schedule(schedule.mask, {k: v for k, v in schedule.metadata.items() if k not in ALIGNED_KEYS})


@dataclass(frozen=True)
class AlignConfig:
    updates: int = 60
    pairs: int = 16  # calibration (class, seed) pairs, seeds 0..pairs-1, all in every update
    lr: float = 0.05

    def __post_init__(self):
        if self.updates < 1 or self.pairs < 1 or not self.lr > 0:
            raise RecacheError(f"alignment needs updates >= 1, pairs >= 1 and lr > 0, "
                               f"got {self.updates}, {self.pairs}, {self.lr}")


class MonotoneSigmas(nn.Module):
    """A non-increasing grid with fixed endpoints, parametrised by softmax gap fractions."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        gaps = (base[:-1] - base[1:]).double()
        if (gaps <= 0).any():
            raise RecacheError("the base sigma grid must be strictly decreasing")
        self.register_buffer("ends", base[[0, -1]].clone())
        self.theta = nn.Parameter(torch.log(gaps / gaps.sum()).float())

    def forward(self) -> torch.Tensor:
        first, last = self.ends
        fractions = self.theta.softmax(0).cumsum(0)
        return torch.cat([first[None], first - (first - last) * fractions[:-1], last[None]])


def align_sigmas(schedule: Schedule, pipe: DigitPipeline, mechanism: str, config: AlignConfig,
                 progress: bool = True) -> tuple[Schedule, list[dict]]:
    """The schedule with ``aligned_sigmas`` in its metadata, and the per-update log."""
    if schedule.T != pipe.steps:
        raise RecacheError(f"schedule has T={schedule.T} steps but the sampler runs {pipe.steps}")
    schedule, name = unaligned(schedule), mechanism
    classes, seeds = calibration_pairs(config.pairs)
    targets, noise = pipe(classes, seeds), pipe.noise(seeds)
    grid = MonotoneSigmas(pipe.sigmas)
    optimizer = torch.optim.Adam(grid.parameters(), lr=config.lr)
    masks = schedule.as_tensor()[None]
    model = pipe.model
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    log, best = [], (float("inf"), None)
    try:
        for update in trange(config.updates + 1, desc=f"align k={schedule.k}", disable=not progress):
            with torch.enable_grad():
                sigmas = grid()
                out, _ = sample_cached(model, noise, sigmas, classes, masks, get_mechanism(name), pipe.guidance)
                loss = ((out - targets) ** 2).mean()
            best = min(best, (loss.item(), sigmas.detach().tolist()), key=lambda b: b[0])
            log.append({"update": update, "loss": loss.item(),
                        "sigmas": [round(s, 6) for s in sigmas.detach().tolist()]})
            if update == config.updates:
                break  # the last entry scores the final grid
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(grid.parameters(), 1.0)
            optimizer.step()
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    base_loss = log[0]["loss"]
    if best[0] >= base_loss:
        return schedule.with_metadata(align_loss=base_loss, base_loss=base_loss, aligned=False), log
    return schedule.with_metadata(aligned_sigmas=best[1], align_loss=best[0], base_loss=base_loss,
                                  align=asdict(config)), log


def align_shift(schedule: Schedule, rollouts, mechanism: str, pairs: int,
                progress: bool = True) -> tuple[Schedule, list[dict]]:
    """Schedule alignment on a diffusers pipeline (``DiffusersRollouts``), without gradients (ours): a pipeline runs
    under ``torch.no_grad`` and its scheduler turns a given grid into NumPy, so ``align_sigmas`` cannot backpropagate
    to the grid there. Instead the grid is searched within the time-shifted family the pipeline's flow-matching
    scheduler makes: the schedule runs with the scheduler at shift ``s0 * f`` for every ``f`` in ``SHIFT_FACTORS``
    (``s0``: the shift fitted to the pipeline's own grid) on ``pairs`` calibration pairs, scored by the MSE to the
    uncached outputs on the pipeline's own grid. The best shift is kept if it beats ``s0``, as ``aligned_shift`` and
    ``aligned_sigmas`` (the grid that scheduler runs); else the schedule keeps its grid. One parameter instead of
    the T - 1 of ``align_sigmas``."""
    if schedule.T != rollouts.steps:
        raise RecacheError(f"schedule has T={schedule.T} steps but the pipeline runs {rollouts.steps}")
    classes, seeds = calibration_pairs(pairs, num_conditions=rollouts.num_conditions)
    targets, base = rollouts(classes, seeds), fit_shift(rollouts.sigmas)[0]
    schedule, plain, log = unaligned(schedule), Schedule(schedule.mask), []
    for factor in tqdm(SHIFT_FACTORS, desc=f"align k={schedule.k}", disable=not progress):
        grid = rollouts.with_grid(rollouts.steps, base * factor)
        out, passes = grid.rollout(classes, seeds, [plain], mechanism)
        if not torch.all(passes == schedule.k):
            raise RuntimeError(f"a rollout realised {passes.tolist()} passes, not {schedule.k}")
        log.append({"shift": round(base * factor, 6), "loss": ((out[0] - targets) ** 2).mean().item(),
                    "sigmas": [round(x, 6) for x in grid.sigmas.tolist()]})
    base_loss = log[SHIFT_FACTORS.index(1.0)]["loss"]
    best = min(log, key=lambda row: row["loss"])
    if best["loss"] >= base_loss:
        return schedule.with_metadata(align_loss=base_loss, base_loss=base_loss, aligned=False), log
    return schedule.with_metadata(aligned_sigmas=best["sigmas"], aligned_shift=best["shift"], align_loss=best["loss"],
                                  base_loss=base_loss, align={"method": "shift", "pairs": pairs,
                                                              "shifts": [row["shift"] for row in log]}), log

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
from tqdm.auto import trange

from recache.errors import RecacheError
from recache.mechanisms import get_mechanism
from recache.protocol import calibration_pairs
from recache.sampling.cached import sample_cached
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


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
    name = mechanism
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

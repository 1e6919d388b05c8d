"""The sampler interface that training, search, calibration and rewards use.

Two samplers implement it: the embedded ``DigitPipeline`` (conditions are digit classes) and ``DiffusersRollouts``
(a diffusers pipeline run through the recache hooks; conditions are indices into a list of prompts). A condition
and a seed name one sample: the same pair gives the same noise whatever batch it is drawn in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from recache.mechanisms import Mechanism
from recache.schedule import Schedule


@runtime_checkable
class Sampler(Protocol):
    """Identity (what a schedule, policy or result was made on), uncached samples and cached rollouts."""

    model_id: str  # the model's name or fingerprint
    steps: int  # T
    sigma_schedule: str  # the sigma grid's name (or the diffusers scheduler's class)
    guidance: float | None  # CFG scale
    num_conditions: int  # conditions are 0 .. num_conditions - 1
    outputs_digits: bool  # outputs are 20x20 digits, which the embedded classifier scores

    def condition_texts(self) -> list[str]:
        """The text of each condition (a digit's name, or the prompt)."""

    def __call__(self, conds, seeds) -> torch.Tensor:
        """Uncached outputs, one per (condition, seed) pair."""

    def rollout(self, conds, seeds, schedules: list[Schedule],
                mechanism: str | Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Every schedule on every pair: outputs (G, B, ...) and realised full passes (G, B)."""

    def rollout_rows(self, conds, seeds, masks: torch.Tensor,
                     mechanism: Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``i``: pair ``i`` under ``masks[i]``; the outputs and each row's realised full passes."""


def sample_with(pipe: Sampler, schedule: Schedule, mechanism: str | Mechanism, conds,
                seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached samples under one schedule, and each sample's realised full passes (counted while sampling)."""
    out, passes = pipe.rollout(conds, seeds, [schedule], mechanism)
    return out[0], passes[0]


def sampler_identity(pipe: Sampler) -> dict:
    """What a result was made on: model, T, sigma grid and guidance. Training checkpoints, search settings and
    evaluation rows record it, and a resume must match it."""
    return {"model": pipe.model_id, "T": pipe.steps, "sigmas": pipe.sigma_schedule, "guidance": pipe.guidance}


@runtime_checkable
class OnlineSampler(Sampler, Protocol):
    """A sampler that also runs online heuristics (TeaCache, FirstBlockCache, DiCache), which decide while sampling:
    the embedded one. Their calibration needs it."""

    def sample_online(self, heuristic, conds, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and each sample's compute mask (B, T)."""

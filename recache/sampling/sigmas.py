"""Noise-level grids for flow matching: ``sigma_0 = 1 > ... > sigma_T = 0`` (k-diffusion's ``get_sigmas_*`` style)."""

from __future__ import annotations

import math

import torch

from recache.errors import RecacheError, is_whole
from recache.schedule.schedule import MAX_STEPS


def get_sigmas_linear(steps: int) -> torch.Tensor:
    """``steps + 1`` evenly spaced sigmas from 1 to 0 (rectified flow; Liu et al. 2022)."""
    _check_steps(steps)
    return torch.linspace(1.0, 0.0, steps + 1)


def get_sigmas_shifted(steps: int, shift: float = 3.0) -> torch.Tensor:
    """Time-shifted grid ``shift*s / (1 + (shift-1)*s)`` of SD3 and FLUX (Esser et al. 2024), FLUX's
    ``mu = ln(shift)``."""
    _check_steps(steps)
    if not (math.isfinite(shift) and shift > 0):
        raise RecacheError(f"shift must be a positive number, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)
    sigmas[0], sigmas[-1] = 1.0, 0.0  # exact endpoints despite rounding
    return sigmas


SIGMA_SCHEDULES = {"linear": get_sigmas_linear, "shifted": get_sigmas_shifted}


def get_sigmas(name: str, steps: int) -> torch.Tensor:
    """The grid called ``name`` (a key of ``SIGMA_SCHEDULES``) with ``steps`` steps."""
    if name not in SIGMA_SCHEDULES:
        raise RecacheError(f"unknown sigma schedule {name!r}; choose one of {', '.join(SIGMA_SCHEDULES)}")
    return SIGMA_SCHEDULES[name](steps)


def _check_steps(steps: int) -> None:
    if not is_whole(steps, 1, MAX_STEPS):
        raise RecacheError(f"the number of steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")

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
GRID_FIT_TOLERANCE = 0.01  # the largest sigma gap to its fitted shifted grid for a grid to count as one


def get_sigmas(name: str, steps: int) -> torch.Tensor:
    """The grid called ``name`` with ``steps`` steps: a key of ``SIGMA_SCHEDULES``, or ``shifted:<shift>`` for a
    time-shifted grid of any positive shift (``shifted`` is ``shifted:3``, ``linear`` is ``shifted:1``)."""
    if name.startswith("shifted:"):
        try:
            shift = float(name.split(":", 1)[1])
        except ValueError:
            shift = math.nan
        if not (math.isfinite(shift) and shift > 0):
            raise RecacheError(f"sigma schedule {name!r} needs a positive shift, as in 'shifted:2.5'")
        return get_sigmas_shifted(steps, shift)
    if name not in SIGMA_SCHEDULES:
        raise RecacheError(f"unknown sigma schedule {name!r}; choose one of {', '.join(SIGMA_SCHEDULES)} "
                           "or shifted:<shift>")
    return SIGMA_SCHEDULES[name](steps)


def fit_shift(sigmas: torch.Tensor) -> tuple[float, float]:
    """The shift ``s`` of the time-shifted grid closest to ``sigmas`` (T + 1 values from 1 down to 0, or T values
    without the final 0, as diffusers' schedulers keep them) and the largest gap ``|sigma_i - grid_i|`` to it.

    A shifted grid has ``sigma = s t / (1 + (s - 1) t)`` at ``t_i = 1 - i / T``, so ``s = sigma (1 - t) / (t (1 -
    sigma))`` at every inner point; ``s`` is their median (in log space). A grid of another family (Karras, cosine,
    a learned aligned grid) shows as a gap above ``GRID_FIT_TOLERANCE``. FLUX's resolution-dependent shift is this
    family with ``s = exp(mu)``."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    T = len(sigmas) - 1 if float(sigmas[-1]) == 0.0 else len(sigmas)
    t = 1 - torch.arange(len(sigmas), dtype=torch.float64) / T
    inner = (t > 0) & (t < 1) & (sigmas > 0) & (sigmas < 1)
    if not inner.any():
        return 1.0, float((sigmas - t).abs().max())
    ratio = sigmas[inner] * (1 - t[inner]) / (t[inner] * (1 - sigmas[inner]))
    shift = float(ratio.log().median().exp())
    grid = shift * t / (1 + (shift - 1) * t)
    return shift, float((sigmas - grid).abs().max())


def _check_steps(steps: int) -> None:
    if not is_whole(steps, 1, MAX_STEPS):
        raise RecacheError(f"the number of steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")

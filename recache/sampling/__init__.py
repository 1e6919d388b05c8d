"""Samplers and noise-level grids."""

from recache.sampling.euler import GuidedVelocity, sample_euler
from recache.sampling.sigmas import SIGMA_SCHEDULES, get_sigmas, get_sigmas_linear, get_sigmas_shifted

__all__ = ["GuidedVelocity", "SIGMA_SCHEDULES", "get_sigmas", "get_sigmas_linear", "get_sigmas_shifted", "sample_euler"]

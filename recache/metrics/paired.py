"""Paired comparison of two methods over the same (condition, seed) pairs."""

from __future__ import annotations

import math

import torch


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    values = values.double()
    n = values.numel()
    return values.mean().item(), (values.std().item() / math.sqrt(n)) if n > 1 else 0.0


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over the same pairs, and its paired standard error."""
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_and_se(a - b)

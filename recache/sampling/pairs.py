"""Checking the (condition, seed) pairs a sampler is asked for: one seed per condition, conditions in range."""

from __future__ import annotations

import torch

from recache.errors import RecacheError


def check_pairs(conds, seeds, num_conditions: int, what: str = "class") -> torch.Tensor:
    """Conditions as a tensor, after checking each is in ``0..num_conditions - 1`` and there is one seed per condition."""
    conds = torch.as_tensor(conds, dtype=torch.long).flatten()
    bad = conds[(conds < 0) | (conds >= num_conditions)]
    if len(bad):
        raise RecacheError(f"{what} {bad[0].item()} is outside 0-{num_conditions - 1}")
    if len(seeds) != len(conds):
        raise RecacheError(f"got {len(seeds)} seeds for {len(conds)} conditions; give one seed per sample")
    return conds

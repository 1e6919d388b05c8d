"""The evaluation protocol, defined once: every measured figure of the project uses these values.

Seeds are split once: calibration seeds (below ``HELDOUT_SEED_BASE``) may be used to train or search schedules;
``HELDOUT_SEED_BASE`` and up are only ever used to report results. ``check_pairs`` checks the (condition, seed) pairs
any sampler is asked for. This module sits at the bottom of the package: training, search and evaluation all read it.
"""

from __future__ import annotations

import torch

from recache.errors import RecacheError

T = 50
BUDGETS = (5, 7, 10, 14, 20)
HELDOUT_SEED_BASE = 900_000
HELDOUT_PER_CLASS = 10  # 100 held-out (class, seed) pairs
NUM_CLASSES = 10
CALIBRATION_PAIRS = 32  # (class, seed) pairs a threshold heuristic is calibrated on, seeds 0..31


def heldout_pairs(per_class: int = HELDOUT_PER_CLASS,
                  num_conditions: int = NUM_CLASSES) -> tuple[torch.Tensor, list[int]]:
    """The held-out (condition, seed) pairs: ``per_class`` of each digit (or prompt of a pipeline), seeds
    ``HELDOUT_SEED_BASE + j``."""
    classes = torch.arange(num_conditions).repeat(per_class)
    return classes, [HELDOUT_SEED_BASE + j for j in range(len(classes))]


def calibration_pairs(n: int, offset: int = 0, num_conditions: int = NUM_CLASSES) -> tuple[torch.Tensor, list[int]]:
    """``n`` (condition, seed) pairs for training or search, seeds ``offset .. offset + n - 1`` (never held out); the
    conditions (classes, or prompts of a pipeline) cycle through ``0..num_conditions - 1``."""
    if offset + n > HELDOUT_SEED_BASE:
        raise RecacheError(f"{n} calibration pairs would reach the held-out seeds; "
                           f"use at most {HELDOUT_SEED_BASE - offset}")
    return torch.arange(offset, offset + n) % num_conditions, list(range(offset, offset + n))


def check_pairs(conds, seeds, num_conditions: int, what: str = "class") -> torch.Tensor:
    """Conditions as a tensor, after checking each is in ``0..num_conditions - 1`` and there is one seed per
    condition."""
    conds = torch.as_tensor(conds, dtype=torch.long).flatten()
    bad = conds[(conds < 0) | (conds >= num_conditions)]
    if len(bad):
        raise RecacheError(f"{what} {bad[0].item()} is outside 0-{num_conditions - 1}")
    if len(seeds) != len(conds):
        raise RecacheError(f"got {len(seeds)} seeds for {len(conds)} conditions; give one seed per sample")
    return conds

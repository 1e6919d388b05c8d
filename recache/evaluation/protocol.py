"""The evaluation protocol, defined once: every measured figure of the project uses these values.

Seeds are split once: ``CALIBRATION_SEEDS`` (below ``HELDOUT_SEED_BASE``) may be used to train or search
schedules; ``HELDOUT_SEED_BASE`` and up are only ever used to report results.
"""

from __future__ import annotations

import torch

T = 50
BUDGETS = (5, 7, 10, 14, 20)
HELDOUT_SEED_BASE = 900_000
HELDOUT_PER_CLASS = 10  # 100 held-out (class, seed) pairs
NUM_CLASSES = 10
CALIBRATION_PAIRS = 32  # (class, seed) pairs a threshold heuristic is calibrated on, seeds 0..31


def heldout_pairs(per_class: int = HELDOUT_PER_CLASS) -> tuple[torch.Tensor, list[int]]:
    """The held-out (class, seed) pairs: ``per_class`` of each digit, seeds ``HELDOUT_SEED_BASE + j``."""
    classes = torch.arange(NUM_CLASSES).repeat(per_class)
    return classes, [HELDOUT_SEED_BASE + j for j in range(len(classes))]


def calibration_pairs(n: int, offset: int = 0, num_conditions: int = NUM_CLASSES) -> tuple[torch.Tensor, list[int]]:
    """``n`` (condition, seed) pairs for training or search, seeds ``offset .. offset + n - 1`` (never held out); the
    conditions (classes, or prompts of a pipeline) cycle through ``0..num_conditions - 1``."""
    if offset + n > HELDOUT_SEED_BASE:
        from recache.errors import RecacheError

        raise RecacheError(f"{n} calibration pairs would reach the held-out seeds; use at most {HELDOUT_SEED_BASE - offset}")
    return torch.arange(offset, offset + n) % num_conditions, list(range(offset, offset + n))

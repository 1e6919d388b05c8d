"""The evaluation protocol and the runner that scores schedules against the uncached output."""

from recache.evaluation.evaluate import METRICS, Reference, evaluate, make_reference
from recache.evaluation.protocol import BUDGETS, CALIBRATION_PAIRS, HELDOUT_SEED_BASE, T, calibration_pairs, heldout_pairs

__all__ = ["BUDGETS", "CALIBRATION_PAIRS", "HELDOUT_SEED_BASE", "METRICS", "Reference", "T", "calibration_pairs", "evaluate", "heldout_pairs",
           "make_reference"]

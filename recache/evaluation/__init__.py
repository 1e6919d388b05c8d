"""The runner that scores schedules against the uncached output (the protocol's values are in ``recache.protocol``)."""

from recache.evaluation.evaluate import METRICS, Reference, evaluate, make_reference

__all__ = ["METRICS", "Reference", "evaluate", "make_reference"]

"""Threshold heuristics, one file each, calibrated to a target budget by ``calibrate.py`` (methods section 6)."""

from __future__ import annotations

from recache.errors import RecacheError
from recache.policies.heuristics.base import Heuristic, OnlineHeuristic, StaticHeuristic
from recache.policies.heuristics.dicache import DiCache
from recache.policies.heuristics.first_block_cache import FirstBlockCache
from recache.policies.heuristics.fixed_interval import FixedInterval
from recache.policies.heuristics.magcache import MagCache
from recache.policies.heuristics.teacache import TeaCache

HEURISTICS: dict[str, type[Heuristic]] = {
    h.name: h for h in (FixedInterval, TeaCache, MagCache, FirstBlockCache, DiCache)}


def get_heuristic(name: str, threshold: float, **options) -> Heuristic:
    if name not in HEURISTICS:
        raise RecacheError(f"unknown heuristic {name!r}; choose one of {', '.join(HEURISTICS)}")
    try:
        return HEURISTICS[name](threshold, **options)
    except TypeError as e:
        raise RecacheError(f"bad options for heuristic {name!r}: {e}") from None


__all__ = ["HEURISTICS", "Heuristic", "OnlineHeuristic", "StaticHeuristic", "get_heuristic"]

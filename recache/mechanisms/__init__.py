"""Caching mechanisms, one file each: what fills a step that does not run the full network."""

from __future__ import annotations

from recache.errors import RecacheError
from recache.mechanisms.base import CacheableModel, Mechanism, Uncached
from recache.mechanisms.delta import Delta
from recache.mechanisms.hicache import HiCache
from recache.mechanisms.reuse import Reuse
from recache.mechanisms.step_skip import StepSkip
from recache.mechanisms.taylorseer import TaylorSeer

MECHANISMS: dict[str, type[Mechanism]] = {m.name: m for m in (StepSkip, Reuse, Delta, TaylorSeer, HiCache)}
HOOK_MECHANISMS = tuple(name for name, m in MECHANISMS.items() if m.runs_as_hook)  # those diffusers hooks can run
DEFAULT_MECHANISM = "taylorseer"  # of the CLI, the API and the hooks, when neither a policy nor a schedule names one


def get_mechanism(name: str, **options) -> Mechanism:
    """A fresh mechanism by its id (``step-skip``, ``reuse``, ``delta``, ``taylorseer``, ``hicache``)."""
    if name not in MECHANISMS:
        raise RecacheError(f"unknown mechanism {name!r}; choose one of {', '.join(MECHANISMS)}")
    try:
        return MECHANISMS[name](**options)
    except (TypeError, ValueError) as e:
        raise RecacheError(f"bad options for mechanism {name!r}: {e}") from None


__all__ = ["CacheableModel", "DEFAULT_MECHANISM", "HOOK_MECHANISMS", "MECHANISMS", "Mechanism", "Uncached",
           "get_mechanism"]

"""A budget as the user states it: full passes ``k``, a fraction of the ``T`` steps, or a target speed-up ``T / k``."""

from __future__ import annotations

import math

from recache.errors import RecacheError
from recache.schedule.schedule import check_budget

Budget = int | float | str

BUDGET_FORMS = ("a whole number of full passes k (e.g. 10), a fraction of the steps in (0, 1] (e.g. 0.25), "
                "or a speed-up like '4x'")


def resolve_budget(budget: Budget, T: int) -> int:
    """The number of full passes ``k`` in 1..T that ``budget`` asks for on a sampler of ``T`` steps.

    ``int`` is ``k`` itself; ``float`` in (0, 1] is ``k = round(f T)``; ``'Sx'`` is ``k = round(T / S)`` for
    ``S >= 1`` (at least one pass either way)."""
    if isinstance(budget, bool) or budget is None:
        raise RecacheError(f"budget {budget!r} is not allowed: give {BUDGET_FORMS}")
    if isinstance(budget, int):
        check_budget(budget, T)
        return budget
    if isinstance(budget, float):
        if not (math.isfinite(budget) and 0 < budget <= 1):
            raise RecacheError(f"budget fraction {budget!r} is not allowed: use a fraction of the steps in (0, 1]")
        return max(1, round(budget * T))
    if isinstance(budget, str) and budget.strip().lower().endswith("x"):
        try:
            speedup = float(budget.strip()[:-1])
        except ValueError:
            speedup = math.nan
        if not (math.isfinite(speedup) and speedup >= 1):
            raise RecacheError(f"speed-up {budget!r} is not allowed: use a number >= 1 followed by x, e.g. '4x'")
        return max(1, min(T, round(T / speedup)))
    raise RecacheError(f"budget {budget!r} is not allowed: give {BUDGET_FORMS}")


def check_budget_form(budget: Budget) -> None:
    """Refuse a budget that no step count could satisfy (before ``T`` is known)."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        if budget < 1:
            raise RecacheError(f"budget k={budget} is not allowed: use a whole number of full passes >= 1")
        return
    resolve_budget(budget, 1)

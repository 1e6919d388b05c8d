"""A budget as the user states it: full passes ``k``, a fraction of the ``T`` steps, or a target speed-up ``T / k``."""

from __future__ import annotations

import math
import numbers

from recache.errors import RecacheError
from recache.schedule.schedule import check_budget

Budget = int | float | str

BUDGET_FORMS = ("a whole number of full passes k (e.g. 10), a fraction of the steps in (0, 1] (e.g. 0.25), "
                "or a speed-up like '4x'")


def _whole(budget) -> int | None:
    """``budget`` as a whole number of passes when it is one: an int of any kind (Python, NumPy, a 0-d integer
    tensor), or a float above 1 with nothing after the point; None otherwise."""
    if hasattr(budget, "ndim") and getattr(budget, "ndim", None) == 0 and hasattr(budget, "item"):
        budget = budget.item()  # a 0-d NumPy or torch value
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        return int(budget)
    if isinstance(budget, float) and budget > 1 and budget.is_integer():
        return int(budget)
    return None


def _at_least(passes: float) -> int:
    """Whole passes, rounded up (the user gets at least the quality asked for), forgiving float noise."""
    return math.ceil(passes - 1e-9)


def resolve_budget(budget: Budget, T: int) -> int:
    """The number of full passes ``k`` in 1..T that ``budget`` asks for on a sampler of ``T`` steps.

    A whole number (``10``, ``numpy.int64(10)``, ``torch.tensor(10)``, ``10.0``) is ``k`` itself; a fraction in
    (0, 1] is ``k = ceil(f T)``; ``'Sx'`` is ``k = ceil(T / S)`` for ``S >= 1``. Fractions and speed-ups are
    rounded up, so the speed-up is at most the one asked for ("4x" at T = 10 is k = 3, 3.3x)."""
    if isinstance(budget, bool) or budget is None:
        raise RecacheError(f"budget {budget!r} is not allowed: give {BUDGET_FORMS}")
    if (k := _whole(budget)) is not None:
        check_budget(k, T)
        return k
    if isinstance(budget, numbers.Real):
        budget = float(budget)
        if not (math.isfinite(budget) and 0 < budget <= 1):
            raise RecacheError(f"budget fraction {budget!r} is not allowed: use a fraction of the steps in (0, 1]")
        return max(1, _at_least(budget * T))
    if isinstance(budget, str) and budget.strip().lower().endswith("x"):
        try:
            speedup = float(budget.strip()[:-1])
        except ValueError:
            speedup = math.nan
        if not (math.isfinite(speedup) and speedup >= 1):
            raise RecacheError(f"speed-up {budget!r} is not allowed: use a number >= 1 followed by x, e.g. '4x'")
        return max(1, min(T, _at_least(T / speedup)))
    raise RecacheError(f"budget {budget!r} is not allowed: give {BUDGET_FORMS}")


def parse_budget(text: str) -> Budget:
    """A budget as typed on the command line: ``10`` (k), ``0.2`` (a fraction) or ``5x`` (a speed-up)."""
    text = text.strip()
    if text.lower().endswith("x"):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise RecacheError(f"budget {text!r} is not allowed: give {BUDGET_FORMS}") from None


def check_budget_form(budget: Budget) -> None:
    """Refuse a budget that no step count could satisfy (before ``T`` is known)."""
    if (k := _whole(budget)) is not None:
        if k < 1:
            raise RecacheError(f"budget k={k} is not allowed: use a whole number of full passes >= 1")
        return
    resolve_budget(budget, 1)

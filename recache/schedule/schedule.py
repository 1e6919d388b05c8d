"""``Schedule``: which of the T sampler steps run the full network (mask 1 = compute, as cache-dit's
``steps_computation_mask``). Exactly ``k`` ones; step 0 is always computed, since nothing is cached before it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from recache.errors import RecacheError, is_whole
from recache.io import read_json, write_json

FORMAT = "recache.schedule/v1"
MAX_STEPS = 10_000  # the most sampler steps a schedule, policy or run may have (samplers use 1 to about 1,000)
_RESERVED_KEYS = ("format", "T", "k", "mask")  # everything else in a schedule file is metadata, kept as it is


def check_budget(k: int, T: int) -> None:
    """A budget is a whole number of full passes in 1..T."""
    if not is_whole(T, 1, MAX_STEPS):
        raise RecacheError(f"the number of steps T must be a whole number from 1 to {MAX_STEPS}, got {T!r}")
    if not is_whole(k, 1, T):
        raise RecacheError(f"budget k={k!r} is not allowed: use a whole number of full passes from 1 to T={T}")


def spread_steps(steps: Sequence[int], T: int) -> list[int]:
    """The nearest ``k = len(steps)`` distinct increasing steps in ``0..T-1`` to the non-decreasing ``steps`` (first
    kept at 0): each pushed past its predecessor, then back below its successor and ``T - k + j``. Shared by the
    warm starts of the v2 trainer and the v2 policy's schedules between trained settings."""
    steps, k = [int(s) for s in steps], len(steps)
    if not 1 <= k <= T:
        raise RecacheError(f"{k} steps do not fit in T={T}")
    steps[0] = 0
    for j in range(1, k):
        steps[j] = max(steps[j], steps[j - 1] + 1)
    for j in range(k - 1, 0, -1):
        steps[j] = min(steps[j], T - k + j, steps[j + 1] - 1 if j + 1 < k else T - 1)
    return steps


def steps_at_noise_levels(levels: torch.Tensor, sigmas: torch.Tensor) -> list[int]:
    """Step 0 and, for each noise level after the first of ``levels`` (the computed steps' sigmas of a schedule on
    another grid, from the highest), the step of ``sigmas`` (T + 1 values) nearest to it, kept distinct by
    ``spread_steps``: the same number of computed steps, placed by noise level rather than by index (ours)."""
    T = len(sigmas) - 1
    nearest = (sigmas[1:T, None].double() - levels.double()[None, 1:]).abs().argmin(0) + 1
    return spread_steps(sorted([0, *nearest.tolist()]), T)


@dataclass(frozen=True)
class Schedule:
    """A compute mask over T steps plus metadata (sigma grid, model id, mechanism, source policy)."""

    mask: tuple[bool, ...]
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        mask = tuple(bool(m) for m in self.mask)
        object.__setattr__(self, "mask", mask)
        if not mask:
            raise RecacheError("a schedule needs at least one step")
        if not mask[0]:
            raise RecacheError("step 0 must be computed (mask[0] = 1): nothing is cached before it")

    @property
    def T(self) -> int:
        return len(self.mask)

    @property
    def k(self) -> int:
        return sum(self.mask)

    @property
    def steps(self) -> list[int]:
        """The computed steps, in order."""
        return [i for i, m in enumerate(self.mask) if m]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.mask, dtype=torch.bool)

    def with_metadata(self, **metadata) -> Schedule:
        return Schedule(self.mask, {**self.metadata, **metadata})

    def __str__(self) -> str:
        return f"Schedule(T={self.T}, k={self.k}, steps={self.steps})"

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_steps(cls, T: int, steps: Sequence[int], **metadata) -> Schedule:
        steps = sorted(set(int(s) for s in steps))
        if any(not 0 <= s < T for s in steps):
            raise RecacheError(f"computed steps {steps} must lie in 0..{T - 1}")
        return cls(tuple(i in steps for i in range(T)), metadata)

    @classmethod
    def uniform(cls, T: int, k: int, **metadata) -> Schedule:
        """Evenly spread: ``{round(j (T-1) / (k-1)) : j = 0..k-1}`` (the native schedule of FORA and TaylorSeer)."""
        check_budget(k, T)
        steps = [0] if k == 1 else [round(j * (T - 1) / (k - 1)) for j in range(k)]
        return cls.from_steps(T, steps, source="uniform", **metadata)

    @classmethod
    def full(cls, T: int, **metadata) -> Schedule:
        return cls((True,) * T, {"source": "full", **metadata})

    # --- interchange --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "T": self.T, "k": self.k, "mask": [int(m) for m in self.mask], **self.metadata}

    def to_cache_dit(self) -> dict:
        """Keyword arguments for cache-dit's ``DBCacheConfig``: a static mask (1 = compute) that forces each 0 to be
        cached, no warm-up (the mask decides from step 0), and the fewest blocks cache-dit runs on a cached step
        (F1B0: its first block still runs, so a cached step costs 1/N of a pass, where recache's costs none)."""
        return {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 0, "num_inference_steps": self.T,
                "steps_computation_mask": [int(m) for m in self.mask], "steps_computation_policy": "static"}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        if not isinstance(data, dict) or not isinstance(data.get("mask"), list):
            raise RecacheError("a schedule needs a 'mask' list of 0/1")
        if data.get("format", FORMAT) != FORMAT:
            raise RecacheError(f"schedule format {str(data['format'])[:100]!r} is unknown; this version of recache "
                               f"reads {FORMAT!r}")
        mask = data["mask"]
        if len(mask) > MAX_STEPS:
            raise RecacheError(f"a schedule has at most {MAX_STEPS} steps, this mask has {len(mask)}")
        if any(isinstance(m, float) or m not in (0, 1) for m in mask):
            raise RecacheError("schedule mask values must be 0 or 1")
        schedule = cls(tuple(bool(m) for m in mask), {k: v for k, v in data.items() if k not in _RESERVED_KEYS})
        for key, value in (("T", schedule.T), ("k", schedule.k)):
            if key in data and data[key] != value:
                raise RecacheError(f"schedule says {key}={data[key]!r} but its mask has {key}={value}")
        grid = data.get("aligned_sigmas")
        if grid is not None and not (isinstance(grid, list) and len(grid) == schedule.T + 1
                                     and all(isinstance(s, int | float) and not isinstance(s, bool)
                                             and -1e-6 <= s <= 1 + 1e-6 for s in grid)
                                     and all(a >= b for a, b in itertools.pairwise(grid))):
            raise RecacheError(f"aligned_sigmas must be T + 1 = {schedule.T + 1} non-increasing numbers in [0, 1]")
        return schedule

    @classmethod
    def load(cls, path: str | os.PathLike, T: int | None = None, model: str | None = None,
             sigmas: str | None = None) -> Schedule:
        """Read a schedule file; ``T``, ``model`` and ``sigmas`` (the sigma grid's name) check that it was made for
        this sampler and model. A schedule that names no grid or model is taken as made for any."""
        data = read_json(path, "schedule file")
        try:
            schedule = cls.from_dict(data)
        except RecacheError as e:
            raise RecacheError(f"schedule file {path}: {e}") from None
        if T is not None and schedule.T != T:
            raise RecacheError(f"schedule file {path} is for T={schedule.T} steps, but this run has T={T}")
        made_for = schedule.metadata.get("model")
        if model is not None and made_for is not None and made_for != model:
            raise RecacheError(f"schedule file {path} was made for model {made_for!r}, not {model!r}")
        grid = schedule.metadata.get("sigmas")
        if sigmas is not None and grid is not None and grid != sigmas:
            raise RecacheError(f"schedule file {path} was made for the {grid!r} sigma grid, not {sigmas!r}; use that "
                               "grid, or allow it on this one (--allow-extrapolate)")
        return schedule

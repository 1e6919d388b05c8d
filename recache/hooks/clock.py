"""Where a transformer call sits in its generation: which generation, which step, how many steps.

The hooks take generation boundaries from what the caller knows, in this order:

1. the pipeline's scheduler (``pipeline_clock``): ``set_timesteps`` makes a new ``timesteps`` tensor for every
   pipeline call, so that tensor names the call; ``step_index`` is None until the call's first ``scheduler.step``
   and counts from ``begin_index``, where an img2img call starts in the grid. The step of a call is
   ``step_index - begin_index`` and the call's step count ``len(timesteps) - begin_index``: the call's own grid, so
   a plan is made for the steps the call really runs;
2. the cache context a loop passes (``cache_context(name, step_index=i, num_inference_steps=T)``, diffusers' own
   fields, which Wan pipelines fill);
3. the noise level of the calls themselves (``next_position``), for a transformer driven directly.

In every case a call at the step of the previous one (the same ``step_index``, or the same timestep) is another
call inside that step (SD3's skip-layer guidance, a second guidance branch in one context), not a new step. These
rules are ours; diffusers' caches count calls instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPosition:
    """``call`` names the generation (compared by identity), ``step`` is the call's 0-based step in it, ``steps``
    its step count (None when the caller does not say), ``from_pipeline`` whether a scheduler said so, ``sigmas``
    the grid it runs (given at a call's first step, where a generation starts; a view of the scheduler's tensor)."""

    call: object
    step: int
    steps: int | None
    from_pipeline: bool = False
    sigmas: torch.Tensor | None = None  # the call's sigma grid (steps + 1 values), when its scheduler tells it


Clock = Callable[[], StepPosition | None]


def pipeline_clock(pipe) -> Clock | None:
    """A clock reading ``pipe.scheduler`` (None for a pipeline without a step-counting scheduler), looked up at each
    call, so a scheduler swapped in after ``enable`` is the one read. Outside a call (no timesteps yet, or the last
    step taken) it answers None and the hooks fall back to rules 2 and 3."""
    if not hasattr(getattr(pipe, "scheduler", None), "step_index"):
        return None

    def position() -> StepPosition | None:
        scheduler = pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or not hasattr(scheduler, "step_index"):
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        index = scheduler.step_index
        step, steps = (0 if index is None else index - begin), len(timesteps) - begin
        sigmas = getattr(scheduler, "sigmas", None) if step == 0 else None  # the grid is read where a call starts
        grid = sigmas[begin:] if isinstance(sigmas, torch.Tensor) and len(sigmas) == len(timesteps) + 1 else None
        return StepPosition(timesteps, step, steps, from_pipeline=True, sigmas=grid) if 0 <= step < steps else None

    return position


def noise_level(timestep) -> float | None:
    """The noise level of a call's ``timestep`` argument (a number or a tensor; per-token timesteps, as Wan 2.2's,
    take their maximum)."""
    if timestep is None:
        return None
    return float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)


def next_position(last: StepPosition | None, last_level: float | None, level: float | None,
                  context_step: int | None, context_steps: int | None) -> StepPosition:
    """The position of a call on a transformer driven directly, from the previous call's position and noise level.

    With a context ``step_index``: a step below the last starts a generation, the same step is another call inside
    it. Otherwise by noise level: a higher level than the last call's starts a generation (sampling only ever lowers
    it), the same level is another call inside the step, a lower one is the next step. Without a timestep every call
    is a step and a generation ends after its ``steps``."""
    if context_step is not None:
        if last is None or context_step < last.step:
            return StepPosition(object(), context_step, context_steps)
        return StepPosition(last.call, context_step, context_steps or last.steps)
    if last is None or (level is not None and last_level is not None and level > last_level):
        return StepPosition(object(), 0, context_steps)
    if level is not None and level == last_level:
        return last
    if level is None and last.steps is not None and last.step + 1 >= last.steps:
        return StepPosition(object(), 0, context_steps)
    return StepPosition(last.call, last.step + 1, last.steps)

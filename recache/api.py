"""The one-line facade over the hooks, cache-dit style: ``recache.enable(pipe, budget=10)``, ``recache.summary(pipe)``,
``recache.disable(pipe)``. ``pipe`` is a diffusers pipeline or a bare supported transformer (``torch.compile``-wrapped
ones too); every denoiser of the pipeline is cached under one schedule (Wan 2.2's two experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from recache.errors import RecacheError
from recache.hooks.clock import pipeline_clock
from recache.hooks.schedule_cache import (
    RecacheHookConfig,
    apply_recache,
    recache_config,
    recache_stats,
    remove_recache,
    reset_recache,
    steps_run,
)
from recache.hooks.transformers import denoisers_of, model_fingerprint, transformer_blocks, transformer_of
from recache.mechanisms import DEFAULT_MECHANISM
from recache.policies.noise_level import NoiseLevelPolicy, load_policy
from recache.policies.recache import ReCachePolicy
from recache.schedule import Budget, Schedule


def enable(pipe, budget: Budget | None = None, *,
           policy: str | os.PathLike | ReCachePolicy | NoiseLevelPolicy | None = None,
           mechanism: str | None = None, schedule: str | os.PathLike | Schedule | None = None,
           num_inference_steps: int | None = None, allow_extrapolate: bool = False,
           uncond_budget: Budget | None = None):
    """Cache ``pipe``'s transformer to ``budget`` full passes per generation (and per CFG branch).

    ``budget``: an int ``k``, a fraction of the steps in (0, 1] or a speed-up like ``"4x"``, resolved against each
    call's ``num_inference_steps``. ``policy``: a learned policy (a folder, v1 or v2) that places the ``k``
    passes; without it the passes are spread uniformly, or follow the fixed ``schedule`` (a file or ``Schedule``).
    ``mechanism`` defaults to the policy's (else ``taylorseer``). A policy plans for the step count and sigma grid
    of each call (the pipeline's scheduler tells them) and refuses ones outside its trained range unless
    ``allow_extrapolate``. ``uncond_budget``: the unconditional CFG branch's own budget (default ``budget``), also
    where the pipeline batches both branches in one call (SD3: by halves of the batch, ``RecacheHookConfig``).
    Every argument is checked before anything is registered, so a refused call leaves ``pipe`` unmodified.
    Returns ``pipe``."""
    denoisers = denoisers_of(pipe)
    for transformer in denoisers:
        transformer_blocks(transformer)
    transformer = denoisers[0]
    if isinstance(policy, (str, os.PathLike)):
        policy = load_policy(policy)
    if isinstance(schedule, (str, os.PathLike)):
        schedule = Schedule.load(schedule)
    if schedule is not None and schedule.metadata.get("model") not in (None, model_fingerprint(transformer)):
        raise RecacheError(f"the schedule was made for model {schedule.metadata['model']!r}, "
                           f"not {model_fingerprint(transformer)!r}")
    if mechanism is None:
        mechanism = (policy.mechanism if policy is not None
                     else (schedule.metadata.get("mechanism") if schedule else None) or DEFAULT_MECHANISM)
    apply_recache(denoisers, RecacheHookConfig(budget=budget, mechanism=mechanism, policy=policy, schedule=schedule,
                                               num_inference_steps=num_inference_steps, clock=pipeline_clock(pipe),
                                               allow_extrapolate=allow_extrapolate, uncond_budget=uncond_budget,
                                               batched_cfg=_batched_cfg(pipe)))
    return pipe


def _batched_cfg(pipe):
    """Whether the pipeline's calls outside any cache context batch the CFG branches [uncond; cond], read at each
    generation's start: SD3 and the other pipelines with a ``do_classifier_free_guidance`` property (those that run
    the branches as two calls name them by cache context, which decides first)."""
    if not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return None
    return lambda: bool(pipe.do_classifier_free_guidance)


def disable(pipe):
    """Remove recache from ``pipe``'s transformer; it then computes exactly as before ``enable``. Returns ``pipe``."""
    remove_recache(denoisers_of(pipe))
    return pipe


def refresh(pipe, num_inference_steps: int | None = None):
    """Start a new generation (what every pipeline call does) and, for a bare transformer, set the step
    count of the next ones. Returns ``pipe``."""
    transformer = transformer_of(pipe)
    config = recache_config(transformer)
    if config is None:
        raise RecacheError("recache is not enabled on this pipeline; call recache.enable first")
    if num_inference_steps is not None:
        config.plan(num_inference_steps)
        config.num_inference_steps = num_inference_steps
    reset_recache(transformer)
    return pipe


@dataclass
class CacheSummary:
    """What the last generation did, per cache context (CFG branch): ``T`` steps, planned ``k``, the computed steps."""

    mechanism: str
    generations: int
    last: dict[str, dict] = field(default_factory=dict)

    @property
    def full_passes(self) -> dict[str, int]:
        """Realised full passes of the last generation, per context."""
        return {name: len(r["computed_steps"]) for name, r in self.last.items()}

    def __str__(self) -> str:
        if not self.last:
            return f"recache ({self.mechanism}): no generation yet"
        lines = [f"recache ({self.mechanism}), {self.generations} generation(s) finished; last:"]
        lines += [f"  {name}: {_describe(r)}" for name, r in self.last.items()]
        return "\n".join(lines)


def _describe(r: dict) -> str:
    """One context's record: computed and cached steps, further calls inside steps, the speed-up in transformer
    passes (calls made over blocks run), and whether the generation ran all its steps."""
    done, ran = len(r["computed_steps"]), steps_run(r)
    calls, passes = ran + r["extra_calls"], done + r["extra_passes"]
    budget = (f"k={r['k'][0]} for the unconditional half of the batch and {r['k'][1]} for the conditional, "
              f"realised {r['row_passes'][0]} and {r['row_passes'][1]}" if r.get("by_halves") else f"k={r['k']}")
    text = (f"{done} computed / {r['cached_steps']} cached of T={r['T']} (budget {budget}, {r['source']} "
            f"schedule), computed steps {r['computed_steps']}")
    if r.get("fallback"):
        text += f"; the policy's guard kept the {r['fallback']} schedule for this budget, T and grid"
    elif r.get("guard") == "interpolated":
        text += "; this T and grid lie between the policy's trained ones (schedule interpolated from them)"
    elif r.get("guard") == "not checked":
        text += "; this T and grid lie outside the policy's trained range (its guard did not check them)"
    for later, step in r.get("moved_passes", []):
        text += f"; the pass of step {later} moved to step {step}, where the next expert starts"
    if "filled_from_other_expert" in r:
        text += (f"; the expert starting at step {r['filled_from_other_expert']} had no pass left and was filled "
                 "from the other expert's cache")
    if r["extra_calls"]:
        text += (f"; {r['extra_calls']} further call(s) inside steps (e.g. skip-layer guidance), "
                 f"{r['extra_passes']} of them ran the blocks")
    text += f", speed-up {calls / max(passes, 1):.2f}x in transformer passes"
    if r.get("cut_short"):
        text += f"; cut short after {ran} of its {r['T']} steps"
    elif ran < r["T"]:
        text += f"; in progress, {ran} of {r['T']} steps so far"
    return text


def summary(pipe) -> CacheSummary:
    """Computed against cached steps and the realised budget of the last generation."""
    stats = recache_stats(transformer_of(pipe))
    if stats is None:
        raise RecacheError("recache is not enabled on this pipeline; call recache.enable first")
    return CacheSummary(stats.mechanism, len(stats.calls), stats.last)

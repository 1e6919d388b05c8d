"""What the diffusers hooks ask of a learned policy: the schedule of ``k`` full passes for a sampler of ``T`` steps.

A ``SchedulePlanner`` is anything that answers that question and says which model and mechanism its schedules are
for; ``ReCachePolicy`` is one. The hooks depend on this protocol, not on the policy class, so they sit below the
policies in the package's layers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from recache.schedule.schedule import Schedule


@runtime_checkable
class SchedulePlanner(Protocol):
    @property
    def model(self) -> str:
        """The fingerprint of the model the schedules were made for."""

    @property
    def mechanism(self) -> str:
        """The caching mechanism the schedules were made for."""

    def schedule_for_steps(self, k: int, T: int) -> Schedule:
        """The schedule of exactly ``k`` full passes on a sampler of ``T`` steps. A planner may also take the
        keywords ``sigmas`` (the sampler's grid, ``T + 1`` values, when the pipeline's scheduler tells it) and
        ``allow_extrapolate`` (plan outside the trained range); the hooks pass them to one that does."""

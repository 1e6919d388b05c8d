"""``DigitPipeline``: the embedded DiT with its sigma grid and guidance, as one callable (diffusers-style)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from recache.errors import RecacheError
from recache.mechanisms import Mechanism, get_mechanism
from recache.models.dit import DiT
from recache.models.pretrained import load_dit, read_config
from recache.protocol import check_pairs
from recache.sampling.cached import masks_of, sample_cached
from recache.sampling.euler import GuidedVelocity
from recache.sampling.interface import sample_with
from recache.sampling.online import sample_online
from recache.sampling.rollouts import sample_rollouts
from recache.sampling.sigmas import get_sigmas
from recache.schedule import Schedule


@dataclass
class DigitPipeline:
    """A class-conditional DiT, its ``sigmas`` (T + 1 values) and CFG ``guidance``; ``pipe(classes, seeds)`` samples.
    It implements the ``Sampler`` and ``OnlineSampler`` interfaces (``recache.sampling.interface``)."""

    model: DiT
    sigmas: torch.Tensor
    guidance: float
    model_id: str = "mnist-dit"
    sigma_schedule: str = "linear"

    @classmethod
    def from_pretrained(cls, name_or_folder: str = "mnist-dit", steps: int | None = None, guidance: float | None = None,
                        sigmas: str | None = None) -> DigitPipeline:
        """Load a model; ``steps``, ``guidance`` and ``sigmas`` default to the values in its ``config.json``."""
        defaults = read_config(name_or_folder).get("sampling", {})
        if not isinstance(defaults, dict):
            raise RecacheError(f"the 'sampling' block of model {name_or_folder!r} must be an object, got {defaults!r}")
        sigmas = sigmas or defaults.get("sigmas", "linear")
        grid = get_sigmas(sigmas, steps if steps is not None else defaults.get("steps", 50))
        guidance = guidance if guidance is not None else defaults.get("guidance", 1.0)
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance <= 100:
            raise RecacheError(f"guidance of model {name_or_folder!r} must be a CFG scale from 0 to 100, "
                               f"got {guidance!r}")
        guidance = float(guidance)
        return cls(load_dit(name_or_folder), grid, guidance, os.fspath(name_or_folder), sigmas)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def num_conditions(self) -> int:
        return self.model.config.num_classes

    outputs_digits = True  # the embedded classifier scores its samples (the ``Sampler`` interface)

    def condition_texts(self) -> list[str]:
        return [str(c) for c in range(self.num_conditions)]

    @property
    def velocity(self) -> GuidedVelocity:
        """The guided velocity ``v(x, sigma, classes)``; its model call is where caching hooks in."""
        return GuidedVelocity(self.model, self.guidance, self.model.null_class)

    def noise(self, seeds: list[int] | torch.Tensor) -> torch.Tensor:
        """One standard-normal image per seed, each from its own generator, so a sample never depends on its batch."""
        c, s = self.model.config.in_channels, self.model.config.image_size
        return torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])

    def check_pairs(self, classes: list[int] | torch.Tensor, seeds: list[int] | torch.Tensor) -> torch.Tensor:
        """Classes as a tensor, after checking each is a class of the model and there is one seed per class."""
        return check_pairs(classes, seeds, self.model.config.num_classes)

    @torch.no_grad()
    def __call__(self, classes: list[int] | torch.Tensor, seeds: list[int] | torch.Tensor,
                 callback=None) -> torch.Tensor:
        """Uncached samples (N, C, H, W) in about [-1, 1] for ``classes[i]`` drawn from the noise of ``seeds[i]``."""
        classes = self.check_pairs(classes, seeds)
        return sample_cached(self.model, self.noise(seeds), self.sigmas, classes, guidance=self.guidance,
                             callback=callback)[0]

    @torch.no_grad()
    def rollout(self, classes: list[int] | torch.Tensor, seeds: list[int] | torch.Tensor, schedules: list[Schedule],
                mechanism: str | Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Every schedule on every (class, seed) pair in one batched call: rows ``g * B + b`` hold schedule ``g`` on
        pair ``b``, each row on its own clock when the schedules differ (``sample_rollouts``). Returns samples
        (G, B, C, H, W) and realised full passes (G, B)."""
        classes = self.check_pairs(classes, seeds)
        for schedule in schedules:
            if schedule.T != self.steps:
                raise RecacheError(f"schedule has T={schedule.T} steps but the sampler runs {self.steps}")
        mechanism = get_mechanism(mechanism) if isinstance(mechanism, str) else mechanism
        G, B = len(schedules), len(classes)
        masks = masks_of(schedules).repeat_interleave(B, dim=0)
        noise = self.noise(seeds).repeat(G, 1, 1, 1)
        run = sample_cached if len({s.mask for s in schedules}) == 1 else sample_rollouts
        out, passes = run(self.model, noise, self.sigmas_for(schedules), classes.repeat(G), masks, mechanism,
                          self.guidance)
        return out.view(G, B, *out.shape[1:]), passes.view(G, B)

    @torch.no_grad()
    def rollout_rows(self, classes, seeds, masks: torch.Tensor,
                     mechanism: Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``i`` samples ``classes[i]`` from ``seeds[i]`` under ``masks[i]``, each row on its own clock; returns the
        samples and each row's realised full passes."""
        classes = self.check_pairs(classes, seeds)
        return sample_rollouts(self.model, self.noise(seeds), self.sigmas, classes, masks, mechanism, self.guidance)

    def sigmas_for(self, schedules: list[Schedule]) -> torch.Tensor:
        """The sigma grid of a batched call: the pipeline's, or the one aligned to these schedules (``aligned_sigmas``,
        from ``recache align``), which must then be the same for all of them."""
        grids = {tuple(s.metadata.get("aligned_sigmas") or ()) for s in schedules}
        if len(grids) > 1:
            raise RecacheError("schedules of one batched call must share their sigma grid (aligned or not)")
        grid = grids.pop()
        if not grid:
            return self.sigmas
        if len(grid) != self.steps + 1 or any(a < b for a, b in itertools.pairwise(grid)):
            raise RecacheError(f"aligned sigmas must be {self.steps + 1} non-increasing values, got {len(grid)}")
        return torch.tensor(grid, dtype=self.sigmas.dtype)

    @torch.no_grad()
    def sample_online(self, heuristic, classes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples under an online heuristic (TeaCache, FirstBlockCache, DiCache) and each sample's compute mask
        (B, T); a sample's realised full passes are its mask's sum."""
        classes = self.check_pairs(classes, seeds)
        return sample_online(self.model, self.noise(seeds), self.sigmas, classes, heuristic, self.guidance)

    def sample_with(self, schedule: Schedule, mechanism: str | Mechanism, classes,
                    seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached samples (B, C, H, W) under one schedule, and each sample's realised full passes."""
        return sample_with(self, schedule, mechanism, classes, seeds)

"""The flow-matching Euler sampler with classifier-free guidance, in k-diffusion's uniform signature.

``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i, cond)``; ``v`` predicts ``noise - x0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

from recache.sampling.finite import FiniteWatch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GuidedVelocity:
    """Classifier-free guidance (Ho & Salimans 2022): ``v_u + scale * (v_c - v_u)``, both branches in one batch.

    The first half of the batch is the conditional branch, the second half the unconditional one, so any
    per-row state a caching mechanism keeps is per CFG branch. With ``scale == 1`` only the conditional
    branch runs.
    """

    def __init__(self, model: Velocity, scale: float, null_cond: int):
        self.model, self.scale, self.null_cond = model, float(scale), null_cond
        self._cond = self._both = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model(x, sigma, cond)
        if cond is not self._cond:  # a sampler passes the same condition at every step: pair it with the null once
            self._cond, self._both = cond, torch.cat([cond, torch.full_like(cond, self.null_cond)])
        return combine_cfg(self.model(torch.cat([x, x]), sigma, self._both), self.scale)


def combine_cfg(v: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch whose first half is the conditional branch: ``v_u + scale (v_c - v_u)``."""
    v_cond, v_uncond = v.chunk(2)
    return torch.lerp(v_uncond, v_cond, scale)


def sample_euler(
    model: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: torch.Tensor,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """Integrate from ``noise`` at ``sigmas[0]`` to ``sigmas[-1]``; one model call per step.

    ``callback`` receives ``{'x', 'i', 'sigma', 'sigma_next', 'velocity', 'denoised'}`` after each step's model
    call, where ``x`` is the state before the update and ``denoised = x - sigma * velocity`` the x0 estimate.
    Gradients flow when enabled by the caller (schedule alignment learns ``sigmas`` through it); callers that
    only sample wrap it in ``torch.no_grad()``. A row that goes non-finite raises ``NonFiniteError`` with the step.
    """
    x, levels = noise, sigmas.unbind(0)
    steps = sigmas[1:] - sigmas[:-1]
    dts = None if steps.requires_grad and torch.is_grad_enabled() else steps.tolist()
    watch = FiniteWatch(len(x), len(sigmas) - 1, x.device)
    for i in trange(len(sigmas) - 1, disable=disable, desc="sampling"):
        v = model(x, levels[i], cond)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": levels[i], "sigma_next": levels[i + 1], "velocity": v,
                      "denoised": x - levels[i] * v})
        x = x + steps[i] * v if dts is None else torch.add(x, v, alpha=dts[i])
        watch.update(x, i)
    watch.check()
    return x

"""The schedule reward ``R = -D(x, x*) + alpha * Q(x, c)`` of ReCache (arXiv 2606.06060, Fig. 3).

``D`` is the fidelity of the cached sample ``x`` to the uncached one ``x*`` from the same noise and condition,
``Q`` the quality of ``x`` for its condition. The paper uses LPIPS and HPS with ``alpha = 7``; on the embedded
digits, ``D`` is one of relative L2, ``1 - SSIM`` or the classifier's feature distance (LPIPS with the extra) and
``Q`` is the classifier's log-probability of the intended class. ``alpha`` sets the scale between the two terms,
so it has to be swept again for every choice of ``D`` and ``Q`` (``bench/recache_ablations.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from recache.errors import RecacheError
from recache.metrics.fidelity import _unit, relative_l2, ssim
from recache.models.classifier import DigitClassifier


def _lpips() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        import lpips  # the optional extra: pip install 'recache[lpips]'
        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:  # missing package, or weights that cannot be downloaded here
        raise RecacheError(f"LPIPS is not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "install the 'lpips' extra with its weights, or use rel_l2, ssim or features") from None

    def distance(x, ref):
        return net(_unit(x).repeat(1, 3 // x.shape[1], 1, 1) * 2 - 1,
                   _unit(ref).repeat(1, 3 // ref.shape[1], 1, 1) * 2 - 1).flatten()
    return distance


FIDELITIES = ("rel_l2", "ssim", "features", "lpips")


def _checked_terms(fidelity: str, alpha: float, allowed: tuple[str, ...], unknown: str):
    """Refuse a fidelity outside ``allowed`` or a negative ``alpha``; the LPIPS distance when it is asked for."""
    if fidelity not in allowed:
        raise RecacheError(f"{unknown.format(fidelity)}; choose from {', '.join(allowed)}")
    if not alpha >= 0:
        raise RecacheError(f"alpha must be >= 0 (the weight of the quality term), got {alpha}")
    return _lpips() if fidelity == "lpips" else None


@dataclass
class Reward:
    """Per-sample reward and its two parts; ``targets`` are uncached samples, ``target_features`` their classifier
    features."""

    classifier: DigitClassifier
    fidelity: str = "rel_l2"
    alpha: float = 0.0

    def __post_init__(self):
        self._lpips = _checked_terms(self.fidelity, self.alpha, FIDELITIES, "unknown fidelity {!r}")

    @torch.no_grad()
    def features(self, targets: torch.Tensor) -> torch.Tensor:
        """What the reward keeps of the uncached targets: their classifier features."""
        return self.classifier.features(targets)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, targets: torch.Tensor, target_features: torch.Tensor,
                 classes: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.classifier.features(x)
        if self.fidelity == "rel_l2":
            distance = relative_l2(x, targets)
        elif self.fidelity == "ssim":
            distance = 1 - ssim(x, targets)
        elif self.fidelity == "features":
            distance = (features - target_features).norm(dim=1)
        else:
            distance = self._lpips(x, targets)
        quality = self.classifier.head(features).log_softmax(-1).gather(1, classes[:, None])[:, 0]
        return {"reward": -distance + self.alpha * quality, "fidelity": distance, "quality": quality}


OUTPUT_FIDELITIES = ("rel_l2", "lpips")


@dataclass
class OutputReward:
    """The same reward on any pipeline's outputs: ``D`` is the relative L2 to the uncached output (latents or
    images) or LPIPS (images in [0, 1], the ``lpips`` extra), ``Q`` an ImageReward score of the prompt (the
    ``image-reward`` extra, only loaded when ``alpha > 0``); ``prompts`` are the conditions' texts."""

    fidelity: str = "rel_l2"
    alpha: float = 0.0
    prompts: list[str] | None = None

    def __post_init__(self):
        self._lpips = _checked_terms(self.fidelity, self.alpha, OUTPUT_FIDELITIES,
                                     "fidelity {!r} is not available on a pipeline")
        if self.alpha > 0:
            from recache.metrics.image_reward import load_image_reward

            self._quality = load_image_reward()

    def features(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.new_zeros(len(targets), 0)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, targets: torch.Tensor, target_features: torch.Tensor,
                 conds: torch.Tensor) -> dict[str, torch.Tensor]:
        distance = relative_l2(x, targets) if self._lpips is None else self._lpips(x * 2 - 1, targets * 2 - 1)
        quality = (self._quality(x, [self.prompts[int(c)] for c in conds]) if self.alpha > 0
                   else torch.zeros_like(distance))
        return {"reward": -distance + self.alpha * quality, "fidelity": distance, "quality": quality}

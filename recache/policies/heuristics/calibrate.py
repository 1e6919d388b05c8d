"""Calibrate a threshold heuristic to a target budget: bisection on its threshold until the mean realised number
of full passes over the calibration pairs matches ``k`` (methods section 6: equal-budget comparisons).

The result is a small JSON artefact (threshold, fitted constants, the mean k it reached, and everything it
depends on: model, T, guidance, sigma schedule, the heuristic's settings, pairs, target k) that ``recache eval``
and ``recache demo`` reuse only when all of these match. A budget a heuristic cannot reach (MagCache's retention
prefix, a fixed interval's ``ceil(T / N)``) is reported with the closest one it can.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from recache.errors import RecacheError, is_whole
from recache.io import check_fields, read_json, write_json
from recache.policies.heuristics import HEURISTICS, Heuristic, StaticHeuristic, get_heuristic
from recache.sampling.interface import OnlineSampler, Sampler
from recache.schedule import check_budget

FORMAT = "recache.heuristic/v2"


@dataclass
class Calibration:
    heuristic: str
    threshold: float
    options: dict
    target_k: int
    mean_k: float  # on the calibration pairs
    pairs: int  # calibration_pairs(pairs): seeds 0..pairs-1
    model: str
    T: int
    guidance: float
    sigmas: str  # the sigma schedule's name
    settings: dict  # the heuristic's options before fitting, defaults filled in (see ``heuristic_settings``)

    def __post_init__(self):
        if self.heuristic not in HEURISTICS:
            raise RecacheError(f"unknown heuristic {self.heuristic!r}; one of {', '.join(HEURISTICS)}")
        check_budget(self.target_k, self.T)
        for name in ("mean_k", "guidance"):  # the threshold is checked by the heuristic (build)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise RecacheError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.mean_k > self.T:
            raise RecacheError(f"mean_k {self.mean_k} is above T={self.T}")
        if not is_whole(self.pairs, 1):
            raise RecacheError(f"pairs must be a whole number >= 1, got {self.pairs!r}")
        if not (isinstance(self.model, str) and isinstance(self.sigmas, str) and isinstance(self.options, dict)
                and isinstance(self.settings, dict)):
            raise RecacheError("model and sigmas must be strings, options and settings objects")

    def matches(self, name: str, target_k: int, pipe: Sampler, pairs: int, options: dict | None = None) -> bool:
        """Whether this calibration was made for this heuristic and settings, budget, pipeline and pairs."""
        mine = (self.heuristic, self.target_k, self.model, self.T, self.guidance, self.sigmas, self.pairs,
                self.settings)
        return mine == (name, target_k, pipe.model_id, pipe.steps, float(pipe.guidance), pipe.sigma_schedule, pairs,
                        heuristic_settings(name, options))

    @property
    def reachable(self) -> bool:
        """Whether the mean realised budget is within half a pass of the target."""
        return abs(self.mean_k - self.target_k) <= 0.5

    def build(self) -> Heuristic:
        return get_heuristic(self.heuristic, self.threshold, **self.options)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {"format": FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: str | os.PathLike, T: int | None = None, model: str | None = None) -> Calibration:
        data = read_json(path, "calibration file")
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise RecacheError(f"calibration file {path} is not a {FORMAT} file")
        try:
            check_fields(data, cls, "the file")
            calibration = cls(**data)
            calibration.build()
        except TypeError as e:
            raise RecacheError(f"calibration file {path} has missing or unknown fields ({e})") from None
        except RecacheError as e:
            raise RecacheError(f"calibration file {path}: {e}") from None
        if T is not None and calibration.T != T:
            raise RecacheError(f"calibration file {path} is for T={calibration.T} steps, but this run has T={T}")
        if model is not None and calibration.model != model:
            raise RecacheError(f"calibration file {path} was made for model {calibration.model!r}, not {model!r}")
        return calibration


def heuristic_settings(name: str, options: dict | None = None) -> dict:
    """A heuristic's options before any fitting, its defaults filled in (as JSON would give them back)."""
    return json.loads(json.dumps(get_heuristic(name, 1.0, **(options or {})).options()))


def realised_passes(heuristic: Heuristic, pipe: OnlineSampler, classes: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Full passes per sample on these pairs (the same for every sample of a static heuristic)."""
    if isinstance(heuristic, StaticHeuristic):
        return torch.full((len(seeds),), heuristic.schedule(pipe.steps).k)
    return pipe.sample_online(heuristic, classes, seeds)[1].sum(1)


def calibrate(name: str, target_k: int, pipe: OnlineSampler, classes: torch.Tensor, seeds: list[int],
              options: dict | None = None, iterations: int = 24, progress: bool = True,
              fitted: dict | None = None) -> Calibration:
    """The threshold whose mean realised k on the pairs is closest to ``target_k`` (ties: the cheaper one), from at
    most ``iterations`` measured thresholds (bracket included). ``options`` are the heuristic's settings; ``fitted``,
    constants already fitted for them on this pipeline and these pairs (another budget's calibration options)."""
    check_budget(target_k, pipe.steps)
    if name not in HEURISTICS:
        raise RecacheError(f"unknown heuristic {name!r}; choose one of {', '.join(HEURISTICS)}")
    cls = HEURISTICS[name]
    settings = heuristic_settings(name, options)
    options = cls.fit(pipe, classes, seeds, {**(options or {}), **(fitted or {})})
    tried: dict[float, float] = {}
    bar = tqdm(desc=f"calibrate {name} to k={target_k}", total=iterations, disable=not progress, leave=False)

    def measure(threshold: float) -> float:
        if threshold not in tried:
            tried[threshold] = float(
                realised_passes(get_heuristic(name, threshold, **options), pipe, classes, seeds).float().mean())
            bar.update()
            bar.set_postfix(threshold=f"{threshold:.4g}", mean_k=f"{tried[threshold]:.2f}")
        return tried[threshold]

    tolerance = 0.5 / len(seeds)
    if getattr(cls, "integer", False):
        for interval in range(1, pipe.steps + 1):
            measure(float(interval))
    else:
        lo, hi = cls.bracket
        for _ in range(4):  # widen the bracket until it holds the target: more passes at lo, fewer at hi
            if measure(lo) >= target_k:
                break
            lo /= 10
        for _ in range(4):
            if measure(hi) <= target_k:
                break
            hi *= 10
        for _ in range(iterations - len(tried)):  # a plain counter: a midpoint met before does not stall it
            if min(abs(k - target_k) for k in tried.values()) <= tolerance:
                break
            mid = math.sqrt(lo * hi)
            if mid in (lo, hi):  # lo and hi are adjacent floats: nothing left to split
                break
            if measure(mid) > target_k:
                lo = mid
            else:
                hi = mid
    bar.close()
    threshold = min(tried, key=lambda t: (abs(tried[t] - target_k), tried[t]))
    return Calibration(name, threshold, options, target_k, tried[threshold], len(seeds), pipe.model_id, pipe.steps,
                       float(pipe.guidance), pipe.sigma_schedule, settings)

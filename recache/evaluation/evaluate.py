"""Score schedules x mechanisms against the uncached reference on (class, seed) pairs; cost included."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from recache.mechanisms import get_mechanism
from recache.metrics import classifier_scores, psnr, relative_l2, ssim
from recache.models.classifier import DigitClassifier
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

METRICS = ("rel_l2", "psnr", "ssim", "feature_distance", "class_correct")


@dataclass
class Reference:
    """Uncached samples for the pairs (computed once), their classifier features, wall time and FLOPs per sample."""

    classes: torch.Tensor
    seeds: list[int]
    images: torch.Tensor
    features: torch.Tensor
    seconds: float
    flops_per_sample: int


def count_flops(pipe: DigitPipeline, schedule: Schedule, mechanism: str) -> int:
    """FLOPs (torch's counter: matmuls and attention) of one guided sample under ``schedule``."""
    with FlopCounterMode(display=False) as counter:
        pipe.sample_with(schedule, mechanism, [0], [0])
    return counter.get_total_flops()


def measure_speedup(pipe: DigitPipeline, schedule: Schedule, mechanism: str, batch: int = 16, runs: int = 3) -> tuple[float, float]:
    """Wall-clock speed-up over uncached sampling of ``batch`` images: the median of ``runs`` same-run ratios,
    each pairing one uncached and one cached run back to back, so drifts of the machine's speed cancel.
    Also returns the median cached time in seconds."""
    classes, seeds = torch.arange(batch) % 10, list(range(batch))
    ratios, times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        pipe(classes, seeds)
        full = time.perf_counter() - start
        start = time.perf_counter()
        pipe.sample_with(schedule, mechanism, classes, seeds)
        times.append(time.perf_counter() - start)
        ratios.append(full / times[-1])
    return statistics.median(ratios), statistics.median(times)


def make_reference(pipe: DigitPipeline, classifier: DigitClassifier, classes: torch.Tensor, seeds: list[int]) -> Reference:
    start = time.perf_counter()
    images = pipe(classes, seeds)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        features = classifier.features(images)
    return Reference(classes, seeds, images, features, seconds, count_flops(pipe, Schedule.full(pipe.steps), "reuse"))


def score(images: torch.Tensor, ref: Reference, classifier: DigitClassifier) -> dict[str, torch.Tensor]:
    scores = {"rel_l2": relative_l2(images, ref.images), "psnr": psnr(images, ref.images), "ssim": ssim(images, ref.images)}
    scores.update(classifier_scores(classifier, images, ref.classes, ref.features))
    return {k: scores[k] for k in METRICS}


def evaluate(pipe: DigitPipeline, classifier: DigitClassifier, ref: Reference, schedule: Schedule, mechanism: str,
             policy: str, timing_runs: int = 3) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One JSONL row per sample, and the per-sample metric tensors for paired comparisons.
    ``timing_runs = 0`` skips the wall-clock measurement (speed-up reported as None)."""
    images, passes = pipe.sample_with(schedule, get_mechanism(mechanism), ref.classes, ref.seeds)
    speedup = seconds = None
    if timing_runs:
        speedup, seconds = (round(v, 4) for v in measure_speedup(pipe, schedule, mechanism, runs=timing_runs))
    flops = count_flops(pipe, schedule, mechanism)
    scores = score(images, ref, classifier)
    common = {"policy": policy, "mechanism": mechanism, "T": schedule.T, "k": schedule.k, "mask": [int(m) for m in schedule.mask],
              "flops": flops, "flops_reduction": round(ref.flops_per_sample / flops, 4),
              "seconds_16": seconds, "speedup": speedup}
    rows = [{**common, "class": int(c), "seed": int(s), "full_passes": int(p),
             **{k: round(float(v[i]), 6) for k, v in scores.items()}}
            for i, (c, s, p) in enumerate(zip(ref.classes, ref.seeds, passes, strict=True))]
    return rows, scores

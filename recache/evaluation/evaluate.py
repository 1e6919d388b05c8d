"""Score methods (a schedule with a mechanism, or an online heuristic) against the uncached reference on
(class, seed) pairs; cost included: realised full passes, pass equivalents, FLOPs and measured wall-clock speed-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from recache import distributed
from recache.metrics import classifier_scores, psnr, relative_l2, ssim
from recache.models.classifier import DigitClassifier
from recache.policies.heuristics import OnlineHeuristic
from recache.sampling.interface import sample_with
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

METRICS = ("rel_l2", "psnr", "ssim", "feature_distance", "class_correct")


def metrics_of(entries: list[dict]) -> list[str]:
    """The metrics these rows or summary entries carry (a diffusers pipeline's images have no digit metrics)."""
    return [m for m in METRICS if entries and m in entries[0]]


@dataclass
class Method:
    """One row of a comparison: a fixed ``schedule`` run with ``mechanism``, or an online ``heuristic`` that fills
    its own skipped steps (``mechanism`` then names that fill). ``policy`` labels where the schedule comes from;
    ``k`` is the target budget."""

    policy: str
    mechanism: str
    k: int
    schedule: Schedule | None = None
    heuristic: OnlineHeuristic | None = None

    def sample(self, pipe: DigitPipeline, classes, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and each sample's compute mask (B, T); for a fixed schedule, after checking that the full passes
        counted while sampling are the schedule's."""
        if self.heuristic is not None:
            return pipe.sample_online(self.heuristic, classes, seeds)
        images, passes = sample_with(pipe, self.schedule, self.mechanism, classes, seeds)
        if not bool((passes == self.schedule.k).all()):
            raise RuntimeError(f"realised full passes {passes.tolist()} differ from the schedule's "
                               f"k = {self.schedule.k}")
        return images, self.schedule.as_tensor().expand(len(seeds), -1)

    @property
    def probe_depth(self) -> int:
        """Blocks an online heuristic runs at each skipped step to decide (0 for fixed schedules)."""
        return self.heuristic.probe_depth if self.heuristic is not None else 0


@dataclass
class Reference:
    """Uncached samples for the pairs (computed once), their classifier features, wall time and FLOPs per sample.

    Under torchrun ``classes``, ``seeds``, ``images`` and ``features`` are this rank's block of the pairs;
    ``first_classes`` and ``first_seeds`` are the first pairs of all (FLOPs are counted and sample strips drawn on
    them)."""

    classes: torch.Tensor
    seeds: list[int]
    images: torch.Tensor
    features: torch.Tensor | None  # None where the outputs are not digits
    labels: torch.Tensor | None  # the digit each condition draws (a pipeline's prompt "3" is condition 0 of "3, 7")
    seconds: float
    flops_per_sample: float
    first_classes: torch.Tensor
    first_seeds: list[int]


def count_flops(run) -> int:
    """FLOPs (torch's counter: matmuls and attention) of ``run()``."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def flops_per_sample(pipe: DigitPipeline, method: Method | None, classes, seeds) -> float:
    """Mean FLOPs of one guided sample over these pairs (``method=None``: uncached)."""
    run = (lambda: pipe(classes, seeds)) if method is None else (lambda: method.sample(pipe, classes, seeds))
    return count_flops(run) / len(seeds)


def measure_speedup(pipe: DigitPipeline, method: Method, batch: int = 16, runs: int = 3) -> tuple[float, float]:
    """Wall-clock speed-up over uncached sampling of ``batch`` images: the median of ``runs`` same-run ratios,
    each pairing one uncached and one cached run back to back, so drifts of the machine's speed cancel.
    Also returns the median cached time in seconds."""
    classes, seeds = torch.arange(batch) % pipe.num_conditions, list(range(batch))
    ratios, times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        pipe(classes, seeds)
        full = time.perf_counter() - start
        start = time.perf_counter()
        method.sample(pipe, classes, seeds)
        times.append(time.perf_counter() - start)
        ratios.append(full / times[-1])
    return statistics.median(ratios), statistics.median(times)


FLOP_PAIRS = 10  # FLOPs are counted on the first pairs (one per class in the held-out order)


def make_reference(pipe: DigitPipeline, classifier: DigitClassifier | None, classes: torch.Tensor,
                   seeds: list[int]) -> Reference:
    """The uncached reference of the pairs; under torchrun each rank samples its block, ``seconds`` is the slowest
    rank's, and only rank 0 counts FLOPs (0 elsewhere). ``classifier`` is None for outputs that are not digits."""
    first_classes, first_seeds = classes[:FLOP_PAIRS], seeds[:FLOP_PAIRS]
    mine = distributed.shard(len(seeds))
    classes, seeds = classes[mine], seeds[mine]
    start = time.perf_counter()
    images = pipe(classes, seeds)
    seconds = max(distributed.all_gather_objects(time.perf_counter() - start))
    with torch.no_grad():
        features = classifier.features(images) if classifier is not None else None
    texts = pipe.condition_texts()
    labels = torch.tensor([int(texts[int(c)]) for c in classes]) if classifier is not None else None
    flops = flops_per_sample(pipe, None, first_classes, first_seeds) if distributed.is_main() else 0
    return Reference(classes, seeds, images, features, labels, seconds, flops, first_classes, first_seeds)


def score(images: torch.Tensor, ref: Reference, classifier: DigitClassifier | None) -> dict[str, torch.Tensor]:
    scores = {"rel_l2": relative_l2(images, ref.images), "psnr": psnr(images, ref.images),
              "ssim": ssim(images, ref.images)}
    if classifier is not None:
        scores.update(classifier_scores(classifier, images, ref.labels, ref.features))
    return {k: scores[k] for k in METRICS if k in scores}


def evaluate(pipe: DigitPipeline, classifier: DigitClassifier, ref: Reference, method: Method,
             timing_runs: int = 3) -> list[dict]:
    """One JSONL row per sample of all the pairs. ``timing_runs = 0`` skips the wall-clock measurement (speed-up
    reported as None). Under torchrun each rank scores its block, rank 0 alone measures time and FLOPs (so no other
    rank competes for the machine meanwhile), and every rank gets all the rows, in the pairs' order."""
    images, masks = method.sample(pipe, ref.classes, ref.seeds)
    passes = masks.sum(1)
    scores = score(images, ref, classifier)
    probe = method.probe_depth / len(pipe.model.blocks) if method.probe_depth else 0.0
    rows = [{"class": int(c), "seed": int(s), "full_passes": int(p),
             "pass_equivalents": round(float(p + (pipe.steps - p) * probe), 4), "mask": [int(v) for v in m],
             **{k: round(float(v[i]), 6) for k, v in scores.items()}}
            for i, (c, s, p, m) in enumerate(zip(ref.classes, ref.seeds, passes, masks, strict=True))]
    if timing_runs:
        distributed.barrier()  # every rank is done with its block: none competes with rank 0's timing
    cost = _cost(pipe, ref, method, timing_runs) if distributed.is_main() else None
    parts = distributed.all_gather_objects((rows, cost))
    cost = parts[0][1]
    return [{**cost, **row} for rank_rows, _ in parts for row in rank_rows]


def _cost(pipe: DigitPipeline, ref: Reference, method: Method, timing_runs: int) -> dict:
    """The columns every row of ``method`` shares: its label, FLOPs and measured speed-up."""
    speedup = seconds = None
    if timing_runs:
        speedup, seconds = (round(v, 4) for v in measure_speedup(pipe, method, runs=timing_runs))
    flops = flops_per_sample(pipe, method, ref.first_classes, ref.first_seeds)
    return {"policy": method.policy, "mechanism": method.mechanism, "T": pipe.steps, "k": method.k,
            "flops": round(flops), "flops_reduction": round(ref.flops_per_sample / flops, 4), "seconds_16": seconds,
            "speedup": speedup}

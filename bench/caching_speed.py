"""Wall-clock cost of caching on the embedded DiT (medians of several runs, same-run ratios).

1. Speed-up at k = 10 of 50 (batch 16, CFG) for every mechanism: median of same-run ratios against full compute.
2. Batched rollouts: G = 8 schedules for one (class, seed) pair in one call vs 8 separate calls.

    .venv/bin/python bench/caching_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from recache.evaluation.evaluate import measure_speedup
from recache.io import write_json
from recache.mechanisms import MECHANISMS
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_schedule(T: int, k: int, rng: random.Random) -> Schedule:
    return Schedule.from_steps(T, [0, *rng.sample(range(1, T), k - 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--out", default="runs/bench/caching_speed.json")
    args = parser.parse_args()
    pipe = DigitPipeline.from_pretrained("mnist-dit")
    T, k = pipe.steps, args.budget
    schedule = Schedule.uniform(T, k)
    measured = {m: measure_speedup(pipe, schedule, m, batch=args.batch, runs=args.runs) for m in MECHANISMS}
    speedups = {m: v[0] for m, v in measured.items()}

    # Cost of one full and one cached step (reuse), from samplings with one and two computed steps.
    classes, seeds = torch.arange(args.batch) % 10, list(range(args.batch))
    one, two = Schedule.from_steps(T, [0]), Schedule.from_steps(T, [0, T // 2])
    t_one = statistics.median(timed(lambda: pipe.sample_with(one, "reuse", classes, seeds)) for _ in range(7))
    t_two = statistics.median(timed(lambda: pipe.sample_with(two, "reuse", classes, seeds)) for _ in range(7))
    full_step, cached_step = t_two - t_one, (t_one - (t_two - t_one)) / (T - 1)

    rng = random.Random(0)
    group = [random_schedule(T, k, rng) for _ in range(args.group)]
    one_class, one_seed = torch.tensor([3]), [900_000]
    batched, separate = [], []
    for _ in range(args.runs):
        batched.append(timed(lambda: pipe.rollout(one_class, one_seed, group, "taylorseer")))
        separate.append(timed(lambda: [pipe.sample_with(s, "taylorseer", one_class, one_seed) for s in group]))
    result = {"T": T, "k": k, "batch": args.batch, "runs": args.runs,
              "median_s": {m: round(v[1], 4) for m, v in measured.items()},
              "speedup": {m: round(v, 3) for m, v in speedups.items()},
              "fraction_of_ideal": {m: round(v / (T / k), 3) for m, v in speedups.items()},
              "full_step_ms": round(1e3 * full_step, 3), "cached_step_ms": round(1e3 * cached_step, 3),
              "bound_of_ideal": round(full_step / (full_step + (T / k - 1) * cached_step), 3),
              "rollout_group": args.group, "rollout_batched_s": round(statistics.median(batched), 4),
              "rollout_separate_s": round(statistics.median(separate), 4),
              "rollout_gain": round(statistics.median(s / b for s, b in zip(separate, batched, strict=True)), 2)}
    write_json(Path(args.out), result)
    print(f"| mechanism | k / T | median (s) | speed-up | of ideal {T / k:g}x |\n|---|---|---|---|---|")
    for m in MECHANISMS:
        print(f"| {m} | {k} / {T} | {result['median_s'][m]:.3f} | {speedups[m]:.2f}x | {result['fraction_of_ideal'][m]:.1%} |")
    print(f"\none full step {result['full_step_ms']:.2f} ms, one cached step (reuse) {result['cached_step_ms']:.3f} ms: "
          f"at best {result['bound_of_ideal']:.1%} of the ideal {T / k:g}x while cached steps cost that much")
    print(f"\nbatched rollouts, G = {args.group} schedules, one (class, seed) pair, taylorseer: "
          f"{result['rollout_batched_s']:.3f} s batched vs {result['rollout_separate_s']:.3f} s separate "
          f"({result['rollout_gain']:.1f}x)")


if __name__ == "__main__":
    main()

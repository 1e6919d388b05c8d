"""Wall-clock cost of caching on the embedded DiT (medians of several runs, same-run ratios).

1. Speed-up at k = 10 of 50 (batch 16, CFG) for every mechanism: median of same-run ratios against full compute.
2. Batched rollouts: G = 8 schedules for one (class, seed) pair in one call vs 8 separate calls, for three kinds
   of group: uniformly random k = 10 schedules; schedules sampled from the shipped taylorseer policy, as a
   REINFORCE update draws them; and 8 copies of the full schedule (every row computes at every step; its rows are
   equal, so the blocks run once per CFG branch: the most merging equal rows can gain).

    .venv/bin/python bench/caching_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from recache.evaluation.evaluate import Method, measure_speedup
from recache.io import write_json
from recache.mechanisms import MECHANISMS
from recache.policies import load_policy
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_schedule(T: int, k: int, rng: random.Random) -> Schedule:
    return Schedule.from_steps(T, [0, *rng.sample(range(1, T), k - 1)])


def step_costs(pipe: DigitPipeline, batch: int) -> tuple[float, float]:
    """Cost of one full and one cached step (reuse), from samplings with one and two computed steps."""
    T = pipe.steps
    classes, seeds = torch.arange(batch) % 10, list(range(batch))
    one, two = Schedule.from_steps(T, [0]), Schedule.from_steps(T, [0, T // 2])
    t_one = statistics.median(timed(lambda: pipe.sample_with(one, "reuse", classes, seeds)) for _ in range(7))
    t_two = statistics.median(timed(lambda: pipe.sample_with(two, "reuse", classes, seeds)) for _ in range(7))
    return t_two - t_one, (t_one - (t_two - t_one)) / (T - 1)


def rollout_timings(pipe: DigitPipeline, k: int, size: int, runs: int):
    """Batched against separate rollouts of groups of random, policy-drawn and full schedules on one pair: the
    groups, the gains per group and the random group's batched and separate times."""
    T, rng = pipe.steps, random.Random(0)
    group = [random_schedule(T, k, rng) for _ in range(size)]
    one_class, one_seed = torch.tensor([3]), [900_000]
    policy = load_policy("mnist-dit-taylorseer")
    with torch.no_grad():
        masks = policy.sample(torch.full((size,), k), pipe.sigmas, torch.Generator().manual_seed(0))
    groups = {"random": group, "policy": [Schedule(tuple(m.tolist())) for m in masks],
              "full": [Schedule.full(T)] * size}
    gains = {name: [] for name in groups}
    batched, separate = [], []
    for _ in range(runs):
        for name, schedules in groups.items():
            together = timed(lambda group=schedules: pipe.rollout(one_class, one_seed, group, "taylorseer"))
            apart = timed(lambda group=schedules: [pipe.sample_with(s, "taylorseer", one_class, one_seed)
                                                   for s in group])
            gains[name].append(apart / together)
            if name == "random":
                batched.append(together)
                separate.append(apart)
    return groups, gains, batched, separate


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
    measured = {m: measure_speedup(pipe, Method("uniform", m, k, schedule), batch=args.batch, runs=args.runs)
                for m in MECHANISMS}
    speedups = {m: v[0] for m, v in measured.items()}

    full_step, cached_step = step_costs(pipe, args.batch)
    groups, gains, batched, separate = rollout_timings(pipe, k, args.group, args.runs)
    result = {"T": T, "k": k, "batch": args.batch, "runs": args.runs,
              "median_s": {m: round(v[1], 4) for m, v in measured.items()},
              "speedup": {m: round(v, 3) for m, v in speedups.items()},
              "fraction_of_ideal": {m: round(v / (T / k), 3) for m, v in speedups.items()},
              "full_step_ms": round(1e3 * full_step, 3), "cached_step_ms": round(1e3 * cached_step, 3),
              "bound_of_ideal": round(full_step / (full_step + (T / k - 1) * cached_step), 3),
              "rollout_group": args.group, "rollout_batched_s": round(statistics.median(batched), 4),
              "rollout_separate_s": round(statistics.median(separate), 4),
              "rollout_gain": {name: round(statistics.median(g), 2) for name, g in gains.items()},
              "steps_computed_by_any": {name: sum(any(s.mask[i] for s in schedules) for i in range(T))
                                        for name, schedules in groups.items()}}
    write_json(Path(args.out), result)
    print(f"| mechanism | k / T | median (s) | speed-up | of ideal {T / k:g}x |\n|---|---|---|---|---|")
    for m in MECHANISMS:
        print(f"| {m} | {k} / {T} | {result['median_s'][m]:.3f} | {speedups[m]:.2f}x | "
              f"{result['fraction_of_ideal'][m]:.1%} |")
    print(f"\none full step {result['full_step_ms']:.2f} ms, one cached step (reuse) "
          f"{result['cached_step_ms']:.3f} ms: at best {result['bound_of_ideal']:.1%} of the ideal {T / k:g}x "
          "while cached steps cost that much")
    print(f"\nbatched rollouts, G = {args.group} schedules, one (class, seed) pair, taylorseer, batched vs separate "
          f"(random: {result['rollout_batched_s']:.3f} s vs {result['rollout_separate_s']:.3f} s):")
    for name in groups:
        print(f"- {name} schedules: {result['rollout_gain'][name]:.1f}x faster, "
              f"{result['steps_computed_by_any'][name]} of {T} steps computed by at least one")


if __name__ == "__main__":
    main()

"""Wall time of uncached 50-step sampling of 16 images with CFG on the embedded DiT (median of several runs).

    .venv/bin/python bench/sampling_speed.py [--runs 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from recache.io import write_json
from recache.sampling.pipeline import DigitPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="runs/bench/sampling_speed.json")
    args = parser.parse_args()
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=args.steps)
    classes = torch.arange(args.batch) % 10
    seeds = list(range(args.batch))
    pipe(classes, seeds)  # warm-up
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        pipe(classes, seeds)
        times.append(time.perf_counter() - start)
    result = {"batch": args.batch, "steps": args.steps, "guidance": pipe.guidance, "runs": args.runs,
              "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
              "max_s": round(max(times), 4), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine()}
    write_json(Path(args.out), result)
    print("| images | steps | guidance | median (s) | min (s) | max (s) | runs |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.batch} | {args.steps} | {pipe.guidance:g} | {result['median_s']:.3f} | {result['min_s']:.3f} | "
          f"{result['max_s']:.3f} | {args.runs} |")


if __name__ == "__main__":
    main()

"""``recache demo``: the main job on the embedded default. For now: a full-compute grid and its wall time."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recache.sampling.pipeline import DigitPipeline
from recache.viz import save_image_grid


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demo on the embedded model and write its outputs")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = DigitPipeline.from_pretrained("mnist-dit")
    classes = torch.arange(10).repeat_interleave(8)
    seeds = list(range(len(classes)))
    pipe(classes[:16], seeds[:16])  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        images = pipe(classes, seeds)
        times.append(time.perf_counter() - start)
    path = out / "samples.png"
    save_image_grid(images.view(10, 8, *images.shape[1:]).transpose(0, 1).flatten(0, 1), path, nrow=10)
    print(f"embedded model: mnist-dit, {pipe.steps} Euler steps, guidance {pipe.guidance:g}, "
          f"{pipe.steps} full passes per sample (uncached)")
    print(f"sampled {len(classes)} digits in {sorted(times)[1]:.2f} s (median of 3) -> {path}")
    return 0

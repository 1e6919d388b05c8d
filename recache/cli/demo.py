"""``recache demo``: the main job on the embedded default.

A full-compute grid with its wall time, then the same digits at k = 10 of 50 full passes under every mechanism,
with the uniform schedule and with the shipped ReCache policy's schedule for that mechanism: realised passes,
error against the uncached output and measured speed-up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recache.cli.options import positive_int
from recache.evaluation.evaluate import measure_speedup
from recache.io import write_text
from recache.mechanisms import MECHANISMS
from recache.metrics import relative_l2
from recache.policies import ReCachePolicy, shipped_policies
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule
from recache.viz import save_image_grid


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demo on the embedded model and write its outputs")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--budget", type=positive_int, default=10, help="full passes k of T = 50 for the cached part (default: 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = DigitPipeline.from_pretrained("mnist-dit")
    schedule = Schedule.uniform(pipe.steps, args.budget)
    policies = {m: ReCachePolicy.from_pretrained(f"{pipe.model_id}-{m}", T=pipe.steps) for m in MECHANISMS
                if f"{pipe.model_id}-{m}" in shipped_policies()}
    learned = {m: policy.schedule(args.budget) for m, policy in policies.items() if policy.config.k_min <= args.budget <= policy.config.k_max}
    classes = torch.arange(10).repeat_interleave(8)
    seeds = [900_000 + i for i in range(len(classes))]  # held-out seeds of the evaluation protocol
    pipe(classes[:16], seeds[:16])  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        reference = pipe(classes, seeds)
        times.append(time.perf_counter() - start)
    save_image_grid(reference.view(10, 8, *reference.shape[1:]).transpose(0, 1).flatten(0, 1), out / "samples.png", nrow=10)
    print(f"embedded model mnist-dit: {len(classes)} digits x {pipe.steps} Euler steps (guidance {pipe.guidance:g}), "
          f"uncached: {sorted(times)[1]:.2f} s (median of 3) -> {out / 'samples.png'}")

    lines = ["| mechanism | schedule | realised full passes | rel. L2 to uncached | speed-up (16 images) |", "|---|---|---|---|---|"]
    grid = [reference[::8]]
    for mechanism in MECHANISMS:
        for name, plan in (("uniform", schedule), ("recache", learned.get(mechanism))):
            if plan is None:
                continue
            images, passes = pipe.sample_with(plan, mechanism, classes, seeds)
            speedup, _ = measure_speedup(pipe, plan, mechanism)
            grid.append(images[::8])
            lines.append(f"| {mechanism} | {name} | {passes.float().mean():g} of {pipe.steps} | {relative_l2(images, reference).mean():.4f} | "
                         f"{speedup:.2f}x |")
    save_image_grid(torch.cat(grid), out / "mechanisms.png", nrow=10)
    table = "\n".join(lines)
    rows = ", ".join(f"{m} ({'uniform, recache' if m in learned else 'uniform'})" for m in MECHANISMS)
    steps = "".join(f"- recache / {m}: {s.steps}\n" for m, s in learned.items())
    write_text(out / "report.md", f"# recache demo\n\nk = {args.budget} of {pipe.steps} full passes, {len(classes)} held-out (class, seed) "
               f"pairs. Computed steps:\n\n- uniform: {schedule.steps}\n{steps}\n{table}\n\n"
               f"![first row uncached, then one row per line of the table: {rows}](mechanisms.png)\n")
    print(f"\nk = {args.budget} of {pipe.steps} full passes:\n{table}")
    print(f"\nreport: {out / 'report.md'} (grid: first row uncached, then {rows})")
    return 0

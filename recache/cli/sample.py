"""``recache sample``: draw a grid of digits, uncached or under a budget (``--budget`` / ``--schedule``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recache.cli.options import (
    add_model_options,
    add_schedule_options,
    batch_int,
    check_writable_file,
    digit_classes,
    resolve_schedule,
)
from recache.sampling.pipeline import DigitPipeline
from recache.viz import image_format, save_image_grid


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample digits (uncached, or with a budget and a mechanism) and save a PNG grid")
    add_model_options(p)
    add_schedule_options(p)
    p.add_argument("--classes", type=digit_classes, default=list(range(10)),
                   help="digits to draw, e.g. 3,7 (default: all)")
    p.add_argument("--per-class", type=batch_int, default=8, help="samples per class (default: 8)")
    p.add_argument("--out", default="samples.png", help="output image, .png or .jpg (default: samples.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable_file(Path(args.out))  # before any sampling: a bad --out must not cost the work
    image_format(args.out)
    pipe = DigitPipeline.from_pretrained(args.model, steps=args.steps, guidance=args.guidance, sigmas=args.sigmas)
    schedule, mechanism = resolve_schedule(args, pipe)
    classes = torch.tensor(args.classes).repeat_interleave(args.per_class)
    seeds = [args.seed + i for i in range(len(classes))]
    start = time.perf_counter()
    if schedule is None:
        images, passes, how = pipe(classes, seeds), torch.full((len(classes),), pipe.steps), "uncached"
    else:
        images, passes = pipe.sample_with(schedule, mechanism, classes, seeds)
        how = f"{mechanism}, {schedule.metadata.get('source', 'schedule')} schedule, computed steps {schedule.steps}"
    seconds = time.perf_counter() - start
    grid = images.view(len(args.classes), args.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
    save_image_grid(grid, args.out, nrow=len(args.classes))
    print(f"{len(classes)} samples x {pipe.steps} steps, realised full passes per sample: {passes.float().mean():g} "
          f"({how}), guidance {pipe.guidance:g}: {seconds:.2f} s -> {args.out}")
    return 0

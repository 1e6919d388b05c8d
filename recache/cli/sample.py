"""``recache sample``: draw a grid of digits, or a diffusers pipeline's images for prompts (``--pipeline``),
uncached or under a budget (``--budget`` / ``--schedule`` / ``--policy``), with the realised passes and the time."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from recache.cli.options import (
    add_model_options,
    add_pipeline_options,
    add_schedule_options,
    batch_int,
    check_writable_file,
    digit_classes,
    given_options,
    load_sampler,
    resolve_schedule,
)
from recache.errors import RecacheError
from recache.sampling.interface import sample_with
from recache.viz import image_format, save_image_grid


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample digits (uncached, or with a budget and a mechanism) and save a PNG grid")
    add_model_options(p)
    add_schedule_options(p)
    p.add_argument("--classes", type=digit_classes, default=None, help="digits to draw, e.g. 3,7 (default: all)")
    p.add_argument("--per-class", type=batch_int, default=None, help="samples per class (default: 8)")
    add_pipeline_options(p)
    p.add_argument("--prompt", default=None, help="with --pipeline: the text to draw (or --prompts FILE, one each)")
    p.add_argument("--out", default="samples.png", help="output image, .png or .jpg (default: samples.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable_file(Path(args.out))  # before any sampling: a bad --out must not cost the work
    image_format(args.out)
    if args.pipeline is not None and (given := given_options(args, ("classes", "per_class"))):
        raise RecacheError(f"{', '.join(given)} draw(s) the embedded model's digits; with --pipeline give "
                           "--prompt TEXT or --prompts FILE")
    pipe = load_sampler(args, output_type="pt")
    if args.pipeline is not None:
        return run_pipeline(args, pipe)
    args.classes, args.per_class = args.classes or list(range(10)), args.per_class or 8
    schedule, mechanism = resolve_schedule(args, pipe)
    classes = torch.tensor(args.classes).repeat_interleave(args.per_class)
    seeds = [args.seed + i for i in range(len(classes))]
    start = time.perf_counter()
    if schedule is None:
        images, passes, how = pipe(classes, seeds), torch.full((len(classes),), pipe.steps), "uncached"
    else:
        images, passes = pipe.sample_with(schedule, mechanism, classes, seeds)
        how = describe(schedule, mechanism)
    seconds = time.perf_counter() - start
    grid = images.view(len(args.classes), args.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
    save_image_grid(grid, args.out, nrow=len(args.classes))
    print(f"{len(classes)} samples x {pipe.steps} steps, realised full passes per sample: {passes.float().mean():g} "
          f"({how}), guidance {pipe.guidance:g}: {seconds:.2f} s -> {args.out}")
    return 0


def run_pipeline(args: argparse.Namespace, rollouts) -> int:
    """One image per prompt from a diffusers pipeline (seeds ``--seed`` on), through the hooks when a budget is given;
    prints each CFG branch's realised full passes (counted by the hooks) and the wall time."""
    schedule, mechanism = resolve_schedule(args, rollouts)
    rollouts.signed = True  # images in [-1, 1], as the grid takes them
    n = rollouts.num_conditions
    conds, seeds = list(range(n)), [args.seed + i for i in range(n)]
    start = time.perf_counter()
    if schedule is None:
        images, passes, how = rollouts(conds, seeds), torch.full((n,), rollouts.steps), "uncached"
    else:
        images, passes = sample_with(rollouts, schedule, mechanism, conds, seeds)
        how = describe(schedule, mechanism)
    seconds = time.perf_counter() - start
    save_image_grid(images, args.out, nrow=min(n, 8), scale=4 if rollouts.outputs_digits else 1)
    print(f"{n} image(s) x {rollouts.steps} steps, realised full passes per CFG branch: "
          f"{', '.join(map(str, passes.tolist()))} ({how}): {seconds:.2f} s -> {args.out}")
    return 0


def describe(schedule, mechanism: str) -> str:
    """How a sample was made: mechanism, where the schedule came from (and what a policy's guard did), its steps."""
    meta = schedule.metadata
    text = f"{mechanism}, {meta.get('source', 'schedule')} schedule"
    text += (", uniform kept by the policy's guard" if meta.get("fallback") == "uniform"
             else ", interpolated between the policy's trained settings" if meta.get("guard") == "interpolated" else "")
    text += f", computed steps {schedule.steps}"
    return text + (f", aligned shift {meta['aligned_shift']:.4g}" if meta.get("aligned_shift") is not None else "")

"""``recache align``: BudCache stage 2, learn the sigma grid for a fixed schedule by distillation."""

from __future__ import annotations

import argparse
from pathlib import Path

from recache.cli.options import (
    add_model_options,
    add_pipeline_options,
    check_writable_file,
    given_options,
    load_sampler,
    positive_float,
    positive_int,
)
from recache.errors import RecacheError
from recache.evaluation.plots import plot_alignment
from recache.io import write_jsonl
from recache.mechanisms import MECHANISMS
from recache.policies.alignment import SHIFT_FACTORS, AlignConfig, align_shift, align_sigmas
from recache.schedule import Schedule


def add_parser(sub) -> None:
    d = AlignConfig()
    p = sub.add_parser("align", help="learn the sigma grid for a fixed schedule (BudCache schedule alignment)")
    add_model_options(p, seed_help=None)
    p.add_argument("--schedule", required=True, help="the schedule file to align (from recache search, or any)")
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=None,
                   help="caching mechanism (default: the schedule's, else taylorseer)")
    p.add_argument("--updates", type=positive_int, default=None,
                   help=f"Adam updates (default: {d.updates}; not on a pipeline, whose alignment tries "
                        f"{len(SHIFT_FACTORS)} shifts)")
    p.add_argument("--pairs", type=positive_int, default=d.pairs,
                   help=f"calibration pairs, seeds 0..pairs-1 (default: {d.pairs})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"learning rate (default: {d.lr:g}; not on a "
                                                                   "pipeline)")
    p.add_argument("--out", default=None, help="aligned schedule file (default: <schedule>-aligned.json next to it)")
    add_pipeline_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.pipeline is not None and (given := given_options(args, ("updates", "lr"))):
        raise RecacheError(f"{given[0]} applies to the embedded model's alignment by gradient descent; on a pipeline "
                           f"the alignment tries {len(SHIFT_FACTORS)} shifts of its scheduler (leave it out)")
    pipe = load_sampler(args)
    schedule = Schedule.load(args.schedule, T=pipe.steps, model=pipe.model_id)
    mechanism = args.mechanism or schedule.metadata.get("mechanism", "taylorseer")
    d = AlignConfig()
    config = AlignConfig(updates=args.updates or d.updates, pairs=args.pairs, lr=args.lr or d.lr)
    out = Path(args.out or Path(args.schedule).with_name(Path(args.schedule).stem + "-aligned.json"))
    check_writable_file(out)  # before the alignment, not after it
    if args.pipeline is None:
        aligned, log = align_sigmas(schedule, pipe, mechanism, config)
        how = f"after {config.updates} updates"
    else:
        aligned, log = align_shift(schedule, pipe, mechanism, config.pairs)
        how = f"over shifts {log[0]['shift']:.3g}-{log[-1]['shift']:.3g}" + (
            f", best {aligned.metadata['aligned_shift']:.4g}" if "aligned_shift" in aligned.metadata else "")
    aligned = aligned.with_metadata(mechanism=mechanism)
    write_jsonl(out.with_suffix(".log.jsonl"), log)
    plot_alignment(log, pipe.sigmas.tolist(), schedule.steps, out.with_suffix(".png"))
    aligned.save(out)
    base, best = aligned.metadata["base_loss"], aligned.metadata["align_loss"]
    verdict = ("kept the base grid (no improvement)" if "aligned_sigmas" not in aligned.metadata
               else f"{1 - best / base:.0%} lower")
    print(f"k = {schedule.k} of {schedule.T} ({mechanism}): MSE to uncached on {config.pairs} calibration pairs "
          f"{base:.4g} -> {best:.4g} ({verdict}) {how}")
    print(f"aligned schedule -> {out} (recache sample/eval --schedule use its sigmas), "
          f"log -> {out.with_suffix('.log.jsonl')}, plot -> {out.with_suffix('.png')}")
    return 0

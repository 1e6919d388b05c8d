"""``recache align``: BudCache stage 2, learn the sigma grid for a fixed schedule by distillation."""

from __future__ import annotations

import argparse
from pathlib import Path

from recache.cli.options import add_model_options, check_writable_file, positive_float, positive_int
from recache.evaluation.plots import plot_alignment
from recache.io import write_jsonl
from recache.mechanisms import MECHANISMS
from recache.policies.alignment import AlignConfig, align_sigmas
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


def add_parser(sub) -> None:
    d = AlignConfig()
    p = sub.add_parser("align", help="learn the sigma grid for a fixed schedule (BudCache schedule alignment)")
    add_model_options(p, seed_help=None)
    p.add_argument("--schedule", required=True, help="the schedule file to align (from recache search, or any)")
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=None,
                   help="caching mechanism (default: the schedule's, else taylorseer)")
    p.add_argument("--updates", type=positive_int, default=d.updates, help=f"Adam updates (default: {d.updates})")
    p.add_argument("--pairs", type=positive_int, default=d.pairs,
                   help=f"calibration pairs, seeds 0..pairs-1 (default: {d.pairs})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"learning rate (default: {d.lr:g})")
    p.add_argument("--out", default=None, help="aligned schedule file (default: <schedule>-aligned.json next to it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipe = DigitPipeline.from_pretrained(args.model, steps=args.steps, guidance=args.guidance, sigmas=args.sigmas)
    schedule = Schedule.load(args.schedule, T=pipe.steps, model=pipe.model_id)
    mechanism = args.mechanism or schedule.metadata.get("mechanism", "taylorseer")
    config = AlignConfig(updates=args.updates, pairs=args.pairs, lr=args.lr)
    out = Path(args.out or Path(args.schedule).with_name(Path(args.schedule).stem + "-aligned.json"))
    check_writable_file(out)  # before the alignment, not after it
    aligned, log = align_sigmas(schedule, pipe, mechanism, config)
    aligned = aligned.with_metadata(mechanism=mechanism)
    write_jsonl(out.with_suffix(".log.jsonl"), log)
    plot_alignment(log, pipe.sigmas.tolist(), schedule.steps, out.with_suffix(".png"))
    aligned.save(out)
    base, best = aligned.metadata["base_loss"], aligned.metadata["align_loss"]
    verdict = ("kept the base grid (no improvement)" if "aligned_sigmas" not in aligned.metadata
               else f"{1 - best / base:.0%} lower")
    print(f"k = {schedule.k} of {schedule.T} ({mechanism}): MSE to uncached on {config.pairs} calibration pairs "
          f"{base:.4g} -> {best:.4g} ({verdict}) after {config.updates} updates")
    print(f"aligned schedule -> {out} (recache sample/eval --schedule use its sigmas), "
          f"log -> {out.with_suffix('.log.jsonl')}, plot -> {out.with_suffix('.png')}")
    return 0

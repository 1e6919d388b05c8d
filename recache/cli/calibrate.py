"""``recache calibrate``: a threshold heuristic's threshold for a target budget (bisection on calibration pairs)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recache.cli.options import add_model_options, check_writable_file, positive_int
from recache.policies.heuristics import HEURISTICS
from recache.policies.heuristics.calibrate import calibrate
from recache.protocol import CALIBRATION_PAIRS, calibration_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import check_budget


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a threshold heuristic (TeaCache, MagCache, ...) to a target budget")
    add_model_options(p, seed_help=None)
    p.add_argument("--heuristic", choices=list(HEURISTICS), required=True, help="which heuristic")
    p.add_argument("--budget", type=positive_int, required=True, help="target mean number of full passes k of T")
    p.add_argument("--pairs", type=positive_int, default=CALIBRATION_PAIRS,
                   help=f"calibration (class, seed) pairs (default: {CALIBRATION_PAIRS})")
    p.add_argument("--out", default=None, help="output JSON (default: runs/calibrate/<heuristic>-k<budget>.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipe = DigitPipeline.from_pretrained(args.model, steps=args.steps, guidance=args.guidance, sigmas=args.sigmas)
    check_budget(args.budget, pipe.steps)
    out = Path(args.out or f"runs/calibrate/{args.heuristic}-k{args.budget}.json")
    check_writable_file(out)  # before the calibration, not after it
    classes, seeds = calibration_pairs(args.pairs)
    start = time.perf_counter()
    calibration = calibrate(args.heuristic, args.budget, pipe, classes, seeds)
    calibration.save(out)
    reached = "" if calibration.reachable else f" (k = {args.budget} is out of its reach: this is the closest)"
    print(f"{args.heuristic}: threshold {calibration.threshold:.5g} gives mean k = {calibration.mean_k:.2f} "
          f"of {pipe.steps} on {args.pairs} calibration pairs{reached}; {time.perf_counter() - start:.0f} s -> {out}")
    return 0

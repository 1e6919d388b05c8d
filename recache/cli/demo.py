"""``recache demo``: the main job on the embedded default, in one command.

Loads the shipped ReCache policies, searches BudCache schedules for two budgets, plans schedules on one measured
cost table (path planning), calibrates the threshold heuristics (TeaCache, MagCache, FirstBlockCache, DiCache, fixed
interval) to the same budgets, evaluates all of them with the uniform schedule on the held-out pairs against the
uncached output (quality next to the realised budget and the measured speed-up, and what each schedule cost to
get), and writes ``runs/demo/report.md`` with its plots.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recache.cli.options import budget_list, check_writable, mechanism_list
from recache.errors import RecacheError
from recache.evaluation.compare import headline, heuristic_methods, markdown_report, run_comparison
from recache.evaluation.evaluate import Method
from recache.io import write_text
from recache.policies import load_policy, shipped_policies
from recache.policies.budcache import SCHEDULE, SearchConfig, search_schedule
from recache.policies.cost_table import GUARD_PAIRS, TABLE_PAIRS, plan_from_calibration, segment_count
from recache.policies.heuristics import HEURISTICS
from recache.protocol import CALIBRATION_PAIRS, heldout_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule, check_budget
from recache.viz import save_image_grid

DEMO_MECHANISMS = "step-skip,reuse,taylorseer,hicache"
SEARCH_MECHANISM = "taylorseer"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="compare learned, searched, heuristic and uniform schedules on the embedded model")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--budgets", type=budget_list, default=[5, 10],
                   help="budgets k of T = 50 to compare (default: 5,10, i.e. 10x and 5x)")
    p.add_argument("--mechanisms", type=mechanism_list, default=mechanism_list(DEMO_MECHANISMS),
                   help=f"mechanisms for the uniform and learned schedules (default: {DEMO_MECHANISMS})")
    p.add_argument("--resume", action="store_true",
                   help="keep the methods already evaluated in OUT/rows.jsonl on the same pairs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    check_writable(out)
    pipe = DigitPipeline.from_pretrained("mnist-dit")
    for k in args.budgets:
        check_budget(k, pipe.steps)
    classes, seeds = heldout_pairs()
    methods = [Method("uniform", m, k, Schedule.uniform(pipe.steps, k)) for k in args.budgets for m in args.mechanisms]
    learned, recache_cost = _shipped_policy_methods(pipe, args)
    methods, costs = methods + learned, {"uniform": "none", "ReCache": recache_cost}
    searched, costs["BudCache"] = _searched_methods(pipe, args.budgets, out)
    methods += searched
    print(f"path planning for k = {', '.join(map(str, args.budgets))}, {SEARCH_MECHANISM} ...")
    began = time.perf_counter()
    plans = plan_from_calibration(pipe, SEARCH_MECHANISM, TABLE_PAIRS, args.budgets, out / "path", resume=True)
    methods += [Method("path", SEARCH_MECHANISM, k, schedule) for k, schedule in plans.items()]
    rollouts = segment_count(pipe.steps) * TABLE_PAIRS + 2 * GUARD_PAIRS * len(args.budgets)
    costs["path plan"] = (f"{time.perf_counter() - began:.0f} s, {rollouts:,} rollouts (one cost table for every "
                          "budget, and the guard)")
    print(f"calibrating {', '.join(HEURISTICS)} to k = {', '.join(map(str, args.budgets))} ...")
    began = time.perf_counter()
    found, notes = heuristic_methods(list(HEURISTICS), args.budgets, pipe, args.mechanisms, out / "calibrations")
    costs["best heuristic"] = (f"{time.perf_counter() - began:.0f} s calibrating the {len(HEURISTICS)} heuristics "
                               f"({CALIBRATION_PAIRS} pairs)")
    methods += found
    print(f"evaluating {len(methods)} methods on {len(seeds)} held-out pairs (quality, FLOPs, wall-clock) ...")
    # the demo's folder is its own: no rows or plots of an earlier demo stay behind unless resuming
    result = run_comparison(pipe, methods, out, classes, seeds, timing_runs=3, resume=args.resume,
                            clear=not args.resume)
    _write_report(pipe, result, out, notes, costs, start)
    _, table = headline(result["rows"], result["budgets"], costs=costs)
    if table:
        print(f"\nclassifier feature distance to uncached (lower is better):\n{table}")
    for note in notes:
        print(f"note: {note}")
    print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


def _shipped_policy_methods(pipe, args) -> tuple[list[Method], str]:
    """The shipped policies' schedules for the budgets they cover, and what training them cost (the rollouts of one
    training, which covers every budget)."""
    methods, rollouts = [], []
    for m in args.mechanisms:
        name = f"{pipe.model_id}-{m}"
        if name in shipped_policies():
            policy = load_policy(name)
            methods += [Method("recache", m, k, policy.schedule(k, sigmas=pipe.sigmas))
                        for k in args.budgets if policy.covers(k, pipe.sigmas)]
            rollouts += [policy.training_rollouts] if policy.training_rollouts else []
    if not methods:
        raise RecacheError(f"no shipped ReCache policy covers budgets {args.budgets} "
                           f"with mechanisms {', '.join(args.mechanisms)}")
    cost = (f"shipped: {max(rollouts):,} rollouts in one training for every budget (not run by the demo)" if rollouts
            else "shipped (one training for every budget)")
    return methods, cost


def _searched_methods(pipe, budgets: list[int], out: Path) -> tuple[list[Method], str]:
    """A BudCache search per budget (reused when its folder holds the schedule), and what the searches cost."""
    methods, seconds, rollouts = [], 0.0, 0
    for config in [SearchConfig(k=k, mechanism=SEARCH_MECHANISM) for k in budgets]:
        print(f"BudCache search, k = {config.k}, {SEARCH_MECHANISM} ...")
        folder, began = out / "search" / f"{SEARCH_MECHANISM}-k{config.k}", time.perf_counter()
        searched = (Schedule.load(folder / SCHEDULE) if (folder / SCHEDULE).exists()
                    else search_schedule(config, pipe, folder, resume=True)[0])
        seconds += time.perf_counter() - began
        rollouts += searched.metadata["evaluations"] * config.pairs
        methods.append(Method("budcache", SEARCH_MECHANISM, config.k, searched))
    return methods, f"{seconds:.0f} s, {rollouts:,} rollouts ({len(budgets)} searches, one per budget)"


def _write_report(pipe, result: dict, out: Path, notes: list[str], costs: dict[str, str], start: float) -> None:
    reference = result["reference"]
    grid_images = reference.view(-1, 10, *reference.shape[1:])[:8].flatten(0, 1)  # digits 0-9 by row
    save_image_grid(grid_images, out / "samples.png", nrow=10)
    intro = (f"Embedded model mnist-dit (T = {pipe.steps} Euler steps, CFG {pipe.guidance:g}); {len(reference)} "
             f"held-out (class, seed) pairs, never used for training, search or calibration; every metric against "
             f"the uncached sample from the same noise and class. Uncached sampling of the {len(reference)} pairs: "
             f"{result['reference_seconds']:.2f} s. ReCache: the shipped policies; BudCache: searched here on "
             f"{SearchConfig(k=1).pairs} calibration pairs with {SEARCH_MECHANISM}; path plan: planned here on a cost "
             f"table of {TABLE_PAIRS} calibration pairs with {SEARCH_MECHANISM}; heuristics: thresholds calibrated "
             f"here to each budget on {CALIBRATION_PAIRS} calibration pairs; TeaCache, FirstBlockCache and DiCache "
             f"fill skipped steps their own way, MagCache and the fixed interval give a fixed schedule, run with each "
             f"mechanism. Demo time: {time.perf_counter() - start:.0f} s.\n\n![uncached samples](samples.png)")
    write_text(out / "report.md", markdown_report(result, "recache demo: equal-budget comparison", intro, notes,
                                                  costs=costs))

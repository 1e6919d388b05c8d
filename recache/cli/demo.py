"""``recache demo``: the main job on the embedded default, in one command.

Loads the shipped ReCache policies, searches BudCache schedules for two budgets, calibrates the threshold
heuristics (TeaCache, MagCache, FirstBlockCache, DiCache, fixed interval) to the same budgets, evaluates all of
them with the uniform schedule on the held-out pairs against the uncached output (quality next to the realised
budget and the measured speed-up), and writes ``runs/demo/report.md`` with its plots.
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
from recache.policies import ReCachePolicy, shipped_policies
from recache.policies.budcache import SCHEDULE, SearchConfig, search_schedule
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
    for m in args.mechanisms:
        name = f"{pipe.model_id}-{m}"
        if name in shipped_policies():
            policy = ReCachePolicy.from_pretrained(name, T=pipe.steps)
            methods += [Method("recache", m, k, policy.schedule(k))
                        for k in args.budgets if policy.config.k_min <= k <= policy.config.k_max]
    if not any(m.policy == "recache" for m in methods):
        raise RecacheError(f"no shipped ReCache policy covers budgets {args.budgets} "
                           f"with mechanisms {', '.join(args.mechanisms)}")
    searches = [SearchConfig(k=k, mechanism=SEARCH_MECHANISM) for k in args.budgets]
    for config in searches:
        print(f"BudCache search, k = {config.k}, {SEARCH_MECHANISM} ...")
        folder = out / "search" / f"{SEARCH_MECHANISM}-k{config.k}"
        searched = (Schedule.load(folder / SCHEDULE) if (folder / SCHEDULE).exists()
                    else search_schedule(config, pipe, folder, resume=True)[0])
        methods.append(Method("budcache", SEARCH_MECHANISM, config.k, searched))
    print(f"calibrating {', '.join(HEURISTICS)} to k = {', '.join(map(str, args.budgets))} ...")
    found, notes = heuristic_methods(list(HEURISTICS), args.budgets, pipe, args.mechanisms, out / "calibrations")
    methods += found
    print(f"evaluating {len(methods)} methods on {len(seeds)} held-out pairs (quality, FLOPs, wall-clock) ...")
    # the demo's folder is its own: no rows or plots of an earlier demo stay behind unless resuming
    result = run_comparison(pipe, methods, out, classes, seeds, timing_runs=3, resume=args.resume,
                            clear=not args.resume)
    reference = result["reference"]
    grid_images = reference.view(-1, 10, *reference.shape[1:])[:8].flatten(0, 1)  # digits 0-9 by row
    save_image_grid(grid_images, out / "samples.png", nrow=10)
    intro = (f"Embedded model mnist-dit (T = {pipe.steps} Euler steps, CFG {pipe.guidance:g}); {len(seeds)} held-out "
             f"(class, seed) pairs, never used for training, search or calibration; every metric against the uncached "
             f"sample from the same noise and class. Uncached sampling of the {len(seeds)} pairs: "
             f"{result['reference_seconds']:.2f} s. ReCache: the shipped policies; BudCache: searched here on "
             f"{searches[0].pairs} calibration pairs with {SEARCH_MECHANISM}; heuristics: thresholds calibrated here "
             f"to each budget on {CALIBRATION_PAIRS} calibration pairs; TeaCache, FirstBlockCache and DiCache fill "
             f"skipped steps their own way, MagCache and the fixed interval give a fixed "
             f"schedule, run with each mechanism. "
             f"Demo time: {time.perf_counter() - start:.0f} s.\n\n"
             f"![uncached samples](samples.png)")
    write_text(out / "report.md", markdown_report(result, "recache demo: equal-budget comparison", intro, notes))
    _, table = headline(result["rows"], result["budgets"])
    if table:
        print(f"\nclassifier feature distance to uncached (lower is better):\n{table}")
    for note in notes:
        print(f"note: {note}")
    print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
    return 0

"""``recache search``: the best schedule for a budget. ``--method anneal`` (the default): BudCache stage 1, simulated
annealing + hill climbing for one budget. ``--method path``: a cost table of cached segments, then exact path planning
for every budget of ``--budgets`` at once."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recache import distributed
from recache.cli.options import (
    BUDGET_HELP,
    add_model_options,
    add_nproc_option,
    add_pipeline_options,
    budget_arg,
    budget_label,
    budget_list,
    check_writable,
    given_options,
    load_sampler,
    nonnegative_float,
    nonnegative_int,
    positive_int,
)
from recache.errors import RecacheError
from recache.evaluation.plots import plot_search_history
from recache.mechanisms import MECHANISMS
from recache.policies.budcache import SCHEDULE, SearchConfig, search_schedule
from recache.policies.cost_table import TABLE, TABLE_PAIRS, plan_from_calibration, schedule_name, segment_count
from recache.policies.path_planning import OBJECTIVES
from recache.schedule import Schedule, resolve_budget

METHODS = ("anneal", "path")
ANNEAL_OPTIONS = ("sa_iters", "hc_iters", "restarts", "t_max", "t_min", "start")


def add_parser(sub) -> None:
    d = SearchConfig(k=10)
    p = sub.add_parser("search", help="search the schedule for a budget (BudCache annealing, or path planning)")
    add_model_options(p, seed_help="seed of the search (default: 0)")
    add_pipeline_options(p)
    p.add_argument("--method", choices=METHODS, default="anneal",
                   help="anneal: BudCache's annealing + hill climbing for one budget (default); path: measure the "
                        "cost of every cached segment once, then plan every budget exactly (docs/path-planning.md)")
    p.add_argument("--budget", type=budget_arg, default=None, help=BUDGET_HELP)
    p.add_argument("--budgets", type=budget_list, default=None,
                   help="with --method path: several budgets k, comma-separated, planned on one cost table")
    p.add_argument("--cost", choices=OBJECTIVES, default="sum",
                   help="with --method path: minimise the sum of segment costs (default) or LeMiCa's "
                        "lexicographic minimax (the largest first)")
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=d.mechanism,
                   help=f"caching mechanism (default: {d.mechanism})")
    p.add_argument("--pairs", type=positive_int, default=None,
                   help=f"calibration (class, seed) pairs, seeds 0..pairs-1, split across ranks with --nproc "
                        f"(default: {d.pairs} for anneal, {TABLE_PAIRS} for path)")
    p.add_argument("--sa-iters", type=nonnegative_int, default=None,
                   help=f"annealing iterations (default: {d.sa_iters})")
    p.add_argument("--hc-iters", type=nonnegative_int, default=None,
                   help=f"at most this many hill-climbing moves (default: {d.hc_iters})")
    p.add_argument("--restarts", type=positive_int, default=None,
                   help=f"random restarts sharing the memo (default: {d.restarts})")
    p.add_argument("--t-max", type=nonnegative_float, default=None,
                   help=f"initial temperature (default: {d.t_max:g})")
    p.add_argument("--t-min", type=nonnegative_float, default=None, help=f"final temperature (default: {d.t_min:g})")
    p.add_argument("--start", default=None, metavar="SCHEDULE",
                   help="with --method anneal: start the annealing from this schedule file (e.g. a path plan's "
                        "schedule-k<k>.json) instead of a random one")
    p.add_argument("--out", default=None, help="output folder (default: runs/search/<mechanism>-k<budget>, or the "
                                               "budget as typed: <mechanism>-5x; runs/search/path-<mechanism> for "
                                               "--method path)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the losses (anneal) or segment costs (path) already measured in --out")
    add_nproc_option(p)
    p.set_defaults(run=run)


def _check_method_options(args: argparse.Namespace) -> None:
    """The options that only one method takes, and the budget, refused in one line before any work."""
    if (args.budget is None) == (args.budgets is None):
        raise RecacheError("give the budget: --budget K, or --budgets K1,K2,... with --method path")
    if args.method == "anneal" and args.budgets is not None:
        raise RecacheError("--budgets needs --method path; an annealing search runs one --budget")
    if args.method == "anneal" and args.cost != "sum":
        raise RecacheError("--cost needs --method path")
    given = given_options(args, ANNEAL_OPTIONS)
    if args.method == "path" and given:
        raise RecacheError(f"{given[0]} needs --method anneal (a path plan has no annealing, restarts or start)")


def run(args: argparse.Namespace) -> int:
    _check_method_options(args)
    if args.method == "path":
        return _run_path(args)
    pairs = args.pairs or SearchConfig(k=1).pairs
    first = Schedule.load(args.start) if args.start is not None else None

    def settings(k: int) -> SearchConfig:
        if first is not None and first.k != k:
            raise RecacheError(f"the start schedule {args.start} has k={first.k}, the budget is k={k}")
        given = {name: getattr(args, name) for name in ANNEAL_OPTIONS[:-1] if getattr(args, name) is not None}
        return SearchConfig(k=k, mechanism=args.mechanism, pairs=pairs, seed=args.seed, **given,
                            start=tuple(first.steps) if first is not None else None)

    if first is None:
        settings(1)  # the settings are refused before the model is loaded, whatever the budget
    out = Path(args.out or f"runs/search/{args.mechanism}-{budget_label(args.budget)}")
    distributed.on_main(lambda: check_writable(out))  # before loading and sampling, not after
    pipe = load_sampler(args)
    if first is not None and first.T != pipe.steps:
        raise RecacheError(f"the start schedule {args.start} is for T={first.T} steps, this search runs {pipe.steps}")
    config = settings(resolve_budget(args.budget, pipe.steps))
    start = time.perf_counter()
    schedule, history = search_schedule(config, pipe, out, resume=args.resume)
    seconds = time.perf_counter() - start
    if not distributed.is_main():
        return 0
    uniform = schedule.metadata["uniform_loss"]
    plot_search_history(history, out / "search.png", uniform)
    print(f"k = {schedule.k} of {schedule.T} ({args.mechanism}): computed steps {schedule.steps}")
    print(f"MSE to uncached on {config.pairs} calibration pairs: {schedule.metadata['search_loss']:.4g} "
          f"(uniform schedule: {uniform:.4g}); "
          f"{schedule.metadata['evaluations']} schedules evaluated in {seconds:.0f} s")
    use = "recache.enable(pipe, schedule=...)" if args.pipeline else "recache sample/eval --schedule"
    print(f"schedule -> {out / SCHEDULE} (use with {use}), history -> {out / 'history.jsonl'}, "
          f"plot -> {out / 'search.png'}")
    return 0


def _run_path(args: argparse.Namespace) -> int:
    pairs = args.pairs or TABLE_PAIRS
    out = Path(args.out or f"runs/search/path-{args.mechanism}")
    distributed.on_main(lambda: check_writable(out))
    pipe = load_sampler(args)
    budgets = args.budgets or [resolve_budget(args.budget, pipe.steps)]
    start = time.perf_counter()
    schedules = plan_from_calibration(pipe, args.mechanism, pairs, budgets, out, objective=args.cost,
                                      resume=args.resume)
    if not distributed.is_main():
        return 0
    print(f"cost table of {segment_count(pipe.steps)} segments on {pairs} calibration pairs "
          f"({args.mechanism}) -> {out / TABLE}; {time.perf_counter() - start:.0f} s with the plans")
    use = "recache.enable(pipe, schedule=...)" if args.pipeline else "recache sample/eval --schedule"
    for k, schedule in schedules.items():
        meta = schedule.metadata
        seeds = meta["guard_seeds"]
        losses = f"MSE on seeds {seeds[0]}-{seeds[1]} {meta['guard_loss']:.4g}, uniform {meta['uniform_loss']:.4g}"
        if meta.get("fallback") == "uniform":
            print(f"k = {k} of {schedule.T}: the plan {meta['planned_steps']} lost to the uniform schedule on fresh "
                  f"calibration pairs ({losses}); kept the uniform one -> {out / schedule_name(k)}")
        else:
            print(f"k = {k} of {schedule.T}: computed steps {list(schedule.steps)}, planned cost "
                  f"{meta['planned_cost']:.4g} ({args.cost}), {losses} -> {out / schedule_name(k)}")
    print(f"use the schedules with {use}")
    return 0

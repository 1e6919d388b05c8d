"""``recache search``: BudCache stage 1, the best schedule for one budget by simulated annealing + hill climbing."""

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
    check_writable,
    load_sampler,
    nonnegative_float,
    nonnegative_int,
    positive_int,
)
from recache.evaluation.plots import plot_search_history
from recache.mechanisms import MECHANISMS
from recache.policies.budcache import SCHEDULE, SearchConfig, search_schedule
from recache.schedule import resolve_budget


def add_parser(sub) -> None:
    d = SearchConfig(k=10)
    p = sub.add_parser("search", help="search the schedule for one budget (BudCache: annealing + hill climbing)")
    add_model_options(p, seed_help="seed of the search (default: 0)")
    add_pipeline_options(p)
    p.add_argument("--budget", type=budget_arg, required=True, help=BUDGET_HELP)
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=d.mechanism,
                   help=f"caching mechanism (default: {d.mechanism})")
    p.add_argument("--pairs", type=positive_int, default=d.pairs,
                   help=f"calibration (class, seed) pairs, seeds 0..pairs-1, split across ranks with --nproc "
                        f"(default: {d.pairs})")
    p.add_argument("--sa-iters", type=nonnegative_int, default=d.sa_iters,
                   help=f"annealing iterations (default: {d.sa_iters})")
    p.add_argument("--hc-iters", type=nonnegative_int, default=d.hc_iters,
                   help=f"at most this many hill-climbing moves (default: {d.hc_iters})")
    p.add_argument("--restarts", type=positive_int, default=d.restarts,
                   help=f"random restarts sharing the memo (default: {d.restarts})")
    p.add_argument("--t-max", type=nonnegative_float, default=d.t_max,
                   help=f"initial temperature (default: {d.t_max:g})")
    p.add_argument("--t-min", type=nonnegative_float, default=d.t_min, help=f"final temperature (default: {d.t_min:g})")
    p.add_argument("--out", default=None, help="output folder (default: runs/search/<mechanism>-k<budget>, or the "
                                               "budget as typed: <mechanism>-5x)")
    p.add_argument("--resume", action="store_true", help="reuse the losses already evaluated by the search in --out")
    add_nproc_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def settings(k: int) -> SearchConfig:
        return SearchConfig(k=k, mechanism=args.mechanism, pairs=args.pairs, sa_iters=args.sa_iters,
                            hc_iters=args.hc_iters, restarts=args.restarts, t_max=args.t_max, t_min=args.t_min,
                            seed=args.seed)

    settings(1)  # the settings are refused before the model is loaded, whatever the budget
    out = Path(args.out or f"runs/search/{args.mechanism}-{budget_label(args.budget)}")
    distributed.on_main(lambda: check_writable(out))  # before loading and sampling, not after
    pipe = load_sampler(args)
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


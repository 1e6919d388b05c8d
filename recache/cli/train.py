"""``recache train``: train a ReCache policy (one per model and mechanism) on calibration seeds: v2 by expert
iteration over several step counts and sigma grids (``--trainer expert``, the default), or v1 by the paper's
REINFORCE for one T and grid (``--trainer reinforce``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from recache import distributed
from recache.cli.options import (
    add_model_options,
    add_nproc_option,
    add_pipeline_options,
    check_writable,
    float_list,
    given_options,
    int_list,
    load_sampler,
    nonnegative_float,
    positive_float,
    positive_int,
)
from recache.errors import RecacheError
from recache.evaluation.plots import EXPERT_CURVES, plot_training_curve
from recache.io import read_jsonl
from recache.mechanisms import MECHANISMS
from recache.metrics.reward import FIDELITIES
from recache.policies.expert_iteration import ROUNDS, ExpertConfig
from recache.policies.expert_training import train_noise_level
from recache.policies.noise_level import grid_name
from recache.policies.reinforce import TrainConfig
from recache.policies.training import LOG, POLICY, train_recache

TRAINERS = ("expert", "reinforce")
REINFORCE_OPTIONS = ("k_min", "k_max", "updates", "group", "entropy", "fidelity", "alpha", "pool", "steps", "sigmas")
EXPERT_OPTIONS = ("train_steps", "train_shifts", "rounds", "screen_pairs")


def add_parser(sub) -> None:
    d, e = TrainConfig(), ExpertConfig()
    p = sub.add_parser("train", help="train a budget-conditioned ReCache schedule policy")
    add_model_options(p, seed_help="seed of the training run: pairs, budgets and schedules drawn (default: 0)")
    add_pipeline_options(p)
    p.add_argument("--trainer", choices=TRAINERS, default="expert",
                   help="expert: ReCache v2, one policy for every budget, step count and sigma grid in its range, "
                        "trained by expert iteration (default); reinforce: v1, the paper's REINFORCE, for one T and "
                        "grid (docs/recache.md)")
    p.add_argument("--train-steps", type=int_list, default=None,
                   help=f"expert: the step counts T to train on (default: {','.join(map(str, e.steps))})")
    p.add_argument("--train-shifts", type=float_list, default=None,
                   help="expert: the time-shifted sigma grids to train on, by shift (1 = linear; default: "
                        f"{','.join(f'{s:g}' for s in e.shifts)})")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help=f"expert: rounds (default: {ROUNDS['default']}; {ROUNDS['delta']} for delta, whose rollouts "
                        "cost more)")
    p.add_argument("--screen-pairs", type=int, default=None,
                   help="expert: score each proposal on this many of the calibration pairs first and only the best "
                        f"{e.promote} of each budget on the rest (0: off; default: {e.screen_pairs})")
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=d.mechanism,
                   help=f"caching mechanism (default: {d.mechanism})")
    p.add_argument("--k-min", type=positive_int, default=None,
                   help=f"reinforce: smallest trained budget (default: {d.k_min})")
    p.add_argument("--k-max", type=positive_int, default=None,
                   help=f"reinforce: largest trained budget (default: {d.k_max})")
    p.add_argument("--updates", type=positive_int, default=None,
                   help=f"reinforce: policy updates (default: {d.updates})")
    p.add_argument("--pairs", type=positive_int, default=None,
                   help=f"expert: calibration pairs of the objective, seeds 0..pairs-1 (default: {e.pairs}); "
                        f"reinforce: pairs per update and rank, N times as many with --nproc N (default: {d.pairs})")
    p.add_argument("--group", type=positive_int, default=None,
                   help=f"reinforce: schedules per pair, G >= 2 (default: {d.group})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"Adam learning rate (default: {d.lr:g})")
    p.add_argument("--entropy", type=nonnegative_float, default=None,
                   help=f"reinforce: entropy bonus, decayed to 0 (default: {d.entropy:g})")
    p.add_argument("--fidelity", choices=FIDELITIES, default=None,
                   help=f"reinforce: distance to the uncached output (default: {d.fidelity})")
    p.add_argument("--alpha", type=nonnegative_float, default=None,
                   help=f"reinforce: weight of the classifier log-probability (default: {d.alpha:g})")
    p.add_argument("--pool", type=positive_int, default=None,
                   help=f"reinforce: calibration pairs, seeds 0..pool-1 (default: {d.pool})")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_nproc_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.trainer == "reinforce":
        if given := given_options(args, EXPERT_OPTIONS):
            raise RecacheError(f"{given[0]} needs --trainer expert")
        return _run_reinforce(args)
    if given := given_options(args, REINFORCE_OPTIONS):
        raise RecacheError(f"{given[0]} needs --trainer reinforce (the expert trainer sets T and the grid per "
                           "setting: --train-steps, --train-shifts)")
    if args.nproc > 1:
        raise RecacheError("the expert trainer runs in one process; leave out --nproc (or use --trainer reinforce)")
    named = {"steps": args.train_steps, "shifts": args.train_shifts, "rounds": args.rounds, "pairs": args.pairs,
             "lr": args.lr, "screen_pairs": args.screen_pairs}
    config = ExpertConfig(mechanism=args.mechanism, seed=args.seed,
                          **{k: tuple(v) if isinstance(v, list) else v for k, v in named.items() if v is not None})
    out = Path(args.out)
    check_writable(out)
    policy = train_noise_level(config, out, load_sampler(args), resume=args.resume)
    plot_training_curve(read_jsonl(out / LOG), out / "training_curve.png", curves=EXPERT_CURVES, x="round")
    print(f"{'T':>4} {'grid':<10} {'budgets':<8} uniform kept (guard, {out / 'guard.json'})")
    for s in policy.config.settings:
        kept = [f["k"] for f in policy.config.fallback if (f["T"], f["shift"]) == (s["T"], s["shift"])]
        budgets = policy.config.budgets(s["T"])
        print(f"{s['T']:>4} {grid_name(s['shift']):<10} {budgets.start:>2}-{budgets.stop - 1:<5} "
              f"{', '.join(map(str, kept)) or 'none'}")
    print(f"policy -> {out / POLICY}, log -> {out / LOG}, curve -> {out / 'training_curve.png'}")
    return 0


def _run_reinforce(args: argparse.Namespace) -> int:
    d = TrainConfig()
    config = TrainConfig(**{f.name: getattr(d, f.name) if getattr(args, f.name) is None else getattr(args, f.name)
                            for f in fields(TrainConfig)})
    out = Path(args.out)
    distributed.on_main(lambda: check_writable(out))  # before loading and sampling, not after
    pipe = load_sampler(args, output_type="pt" if config.fidelity == "lpips" or config.alpha > 0 else "latent")
    policy = train_recache(config, out, pipe, resume=args.resume)
    if not distributed.is_main():
        return 0
    plot_training_curve(read_jsonl(out / LOG), out / "training_curve.png")
    print(f"{'k':>3}  computed steps (deterministic top-k; 'uniform' where the guard kept the uniform schedule)")
    for k in range(config.k_min, config.k_max + 1):
        print(f"{k:>3}  {policy.schedule(k).steps}" + ("  uniform" if k in policy.config.fallback else ""))
    broken = policy.nested_budgets()
    print("schedules are nested across budgets" if not broken
          else f"not nested at k = {broken} (S(k) not inside S(k+1); --nested enforces it)")
    print(f"uniform kept at k = {policy.config.fallback} (calibration guard, {out / 'guard.json'})"
          if policy.config.fallback
          else "the learned schedule beats uniform on the calibration guard pairs at every budget")
    print(f"policy -> {out / POLICY}, log -> {out / LOG}, curve -> {out / 'training_curve.png'}")
    return 0

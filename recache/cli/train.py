"""``recache train``: train a ReCache policy (one per model and mechanism) by REINFORCE on calibration seeds."""

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
    load_sampler,
    nonnegative_float,
    positive_float,
    positive_int,
)
from recache.evaluation.plots import plot_training_curve
from recache.io import read_jsonl
from recache.mechanisms import MECHANISMS
from recache.metrics.reward import FIDELITIES
from recache.policies.reinforce import TrainConfig
from recache.policies.training import LOG, POLICY, train_recache


def add_parser(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a budget-conditioned ReCache schedule policy (REINFORCE)")
    add_model_options(p, seed_help="seed of the training run: pairs, budgets and schedules drawn (default: 0)")
    add_pipeline_options(p)
    p.add_argument("--mechanism", choices=list(MECHANISMS), default=d.mechanism,
                   help=f"caching mechanism (default: {d.mechanism})")
    p.add_argument("--k-min", type=positive_int, default=d.k_min, help=f"smallest trained budget (default: {d.k_min})")
    p.add_argument("--k-max", type=positive_int, default=d.k_max, help=f"largest trained budget (default: {d.k_max})")
    p.add_argument("--updates", type=positive_int, default=d.updates, help=f"policy updates (default: {d.updates})")
    p.add_argument("--pairs", type=positive_int, default=d.pairs,
                   help=f"(class, seed) pairs per update and rank; with --nproc N an update has N times as many "
                        f"(default: {d.pairs})")
    p.add_argument("--group", type=positive_int, default=d.group,
                   help=f"schedules per pair, G >= 2 (default: {d.group})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate (default: {d.lr:g})")
    p.add_argument("--entropy", type=nonnegative_float, default=d.entropy,
                   help=f"entropy bonus, decayed to 0 (default: {d.entropy:g})")
    p.add_argument("--fidelity", choices=FIDELITIES, default=d.fidelity,
                   help=f"distance to the uncached output (default: {d.fidelity})")
    p.add_argument("--alpha", type=nonnegative_float, default=d.alpha,
                   help=f"weight of the classifier log-probability (default: {d.alpha:g})")
    p.add_argument("--pool", type=positive_int, default=d.pool,
                   help=f"calibration pairs, seeds 0..pool-1 (default: {d.pool})")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_nproc_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    out = Path(args.out)
    distributed.on_main(lambda: check_writable(out))  # before loading and sampling, not after
    pipe = load_sampler(args, output_type="pt" if args.fidelity == "lpips" or args.alpha > 0 else "latent")
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

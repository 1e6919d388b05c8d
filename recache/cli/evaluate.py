"""``recache eval``: methods (uniform, schedule files, learned policies, calibrated heuristics) x mechanisms x budgets
against the uncached output on the held-out protocol, on the embedded model or a diffusers pipeline (``--pipeline``
with a prompts file: each prompt with held-out seeds): JSONL rows, a Markdown report and PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from recache import distributed
from recache.cli.options import (
    add_model_options,
    add_nproc_option,
    add_pipeline_options,
    add_policy_options,
    batch_int,
    budget_list,
    check_writable,
    heuristic_list,
    load_policy,
    load_sampler,
    load_schedule,
    mechanism_list,
    nonnegative_int,
    policy_schedule,
    positive_int,
)
from recache.errors import RecacheError
from recache.evaluation.compare import heuristic_methods, markdown_report, run_comparison
from recache.evaluation.evaluate import Method
from recache.evaluation.report import markdown_table
from recache.io import write_text
from recache.mechanisms import HOOK_MECHANISMS, MECHANISMS
from recache.policies.heuristics import HEURISTICS
from recache.protocol import BUDGETS, CALIBRATION_PAIRS, calibration_pairs, heldout_pairs
from recache.schedule import Schedule, check_budget


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate schedules x mechanisms x budgets on held-out seeds")
    add_model_options(p, seed_help=None)
    p.add_argument("--budgets", type=budget_list, default=list(BUDGETS),
                   help="uniform-schedule budgets (default: 5,7,10,14,20)")
    p.add_argument("--mechanisms", type=mechanism_list, default=None,
                   help="comma-separated, or all (default: all; on a pipeline, those that run as hooks)")
    p.add_argument("--schedule", action="append", default=[], help="also evaluate this schedule file (repeatable)")
    p.add_argument("--policy", action="append", default=[],
                   help="also evaluate a trained policy (folder or shipped name) at every budget, "
                        "with its own mechanism (repeatable)")
    add_policy_options(p)
    p.add_argument("--heuristics", type=heuristic_list, default=[],
                   help=f"threshold heuristics to calibrate to every budget and compare: comma-separated from "
                        f"{', '.join(HEURISTICS)}, or all")
    p.add_argument("--calibration-pairs", type=positive_int, default=CALIBRATION_PAIRS,
                   help=f"calibration pairs for the heuristics' thresholds (default: {CALIBRATION_PAIRS})")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the methods already in OUT/rows.jsonl whose rows cover exactly this run's pairs, "
                            "on the same model, T, sigmas and guidance (calibrations in OUT/calibrations are reused "
                            "whenever they match)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an evaluation already in OUT (its rows, summaries and plots)")
    p.add_argument("--pairs", choices=("heldout", "calibration"), default="heldout",
                   help="held-out seeds (default), or the calibration seeds policies are trained on, "
                        "to see overfitting")
    p.add_argument("--per-class", type=batch_int, default=10,
                   help="held-out pairs per class, or per prompt with --pipeline (default: 10)")
    add_pipeline_options(p)
    p.add_argument("--timing-runs", type=nonnegative_int, default=3,
                   help="same-run timings per row for the speed-up; 0 skips (default: 3)")
    p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    add_nproc_option(p)
    p.set_defaults(run=run)


def guard_notes(name: str, schedules: list[Schedule]) -> list[str]:
    """What a policy's calibration guard did for these schedules: where it kept the uniform schedule, and (v2) where
    the setting was not one it was trained and checked on."""
    kept = [s.k for s in schedules if s.metadata.get("fallback") == "uniform"]
    between = [s.k for s in schedules if s.metadata.get("guard") == "interpolated"]
    unchecked = [s.k for s in schedules if s.metadata.get("guard") == "not checked"]
    notes = [f"policy {name}: uniform schedule kept at k = {kept} (its calibration guard: the learned one did not "
             "beat uniform there, or, between trained settings, not clearly at the settings around it)"] if kept else []
    notes += [f"policy {name}: k = {between} on this T and grid are interpolated from the trained settings around "
              "it"] if between else []
    return notes + ([f"policy {name}: k = {unchecked} on this T and grid were not checked by its guard (outside the "
                     "trained range, allowed by --allow-extrapolate)"] if unchecked else [])


def load_eval_sampler(args: argparse.Namespace):
    """The embedded model, or (``--pipeline``) the pipeline's images in [-1, 1] (the digits of mnist-flux)."""
    if args.pipeline is None:
        args.mechanisms = args.mechanisms or list(MECHANISMS)
        return load_sampler(args)
    args.mechanisms = args.mechanisms or list(HOOK_MECHANISMS)
    if not_hooks := [m for m in args.mechanisms if m not in HOOK_MECHANISMS]:
        raise RecacheError(f"mechanism(s) {', '.join(not_hooks)} cannot run on a diffusers pipeline; choose from "
                           f"{', '.join(HOOK_MECHANISMS)}")
    if args.heuristics:
        raise RecacheError("--heuristics: the threshold heuristics run on the embedded model only")
    pipe = load_sampler(args, output_type="pt")
    pipe.signed = True
    return pipe


def run(args: argparse.Namespace) -> int:
    pipe = load_eval_sampler(args)
    for k in args.budgets:
        check_budget(k, pipe.steps)
    out = Path(args.out)
    distributed.on_main(lambda: check_writable(out))
    if (out / "rows.jsonl").exists() and not (args.resume or args.overwrite):
        raise RecacheError(f"{out} already holds an evaluation; resume it (--resume), replace it (--overwrite) or "
                           "choose another --out")
    methods = [Method("uniform", m, k, Schedule.uniform(pipe.steps, k)) for k in args.budgets for m in args.mechanisms]
    for f in args.schedule:
        schedule = load_schedule(f, pipe, args.allow_extrapolate)
        methods += [Method(f"file:{Path(f).stem}", m, schedule.k, schedule) for m in args.mechanisms]
    policies = [(name, load_policy(name, pipe, allow_extrapolate=args.allow_extrapolate)) for name in args.policy]
    shared = len({p.config.mechanism for _, p in policies}) < len(policies)  # then the labels name the policies
    notes = []
    for name, policy in policies:
        label = "recache" + ("-nested" if args.nested else "") + (f":{Path(name).name}" if shared else "")
        schedules = [policy_schedule(policy, k, pipe, args.nested, args.allow_extrapolate) for k in args.budgets]
        methods += [Method(label, policy.config.mechanism, s.k, s) for s in schedules]
        notes += guard_notes(name, schedules)
    if args.heuristics:
        found, notes = heuristic_methods(args.heuristics, args.budgets, pipe, args.mechanisms, out / "calibrations",
                                         args.calibration_pairs)
        methods += found
    n = pipe.num_conditions
    classes, seeds = (heldout_pairs(args.per_class, n) if args.pairs == "heldout"
                      else calibration_pairs(n * args.per_class, num_conditions=n))
    result = run_comparison(pipe, methods, out, classes, seeds, args.timing_runs, resume=args.resume,
                            clear=args.overwrite)
    if not distributed.is_main():
        return 0
    intro = (f"{args.pipeline or pipe.model_id}, T = {pipe.steps}, {len(seeds)} {args.pairs} pairs; metrics against "
             f"the uncached output from the same noise and {'class' if pipe.outputs_digits else 'prompt'}. Uncached "
             f"sampling of the {len(seeds)} pairs took {result['reference_seconds']:.2f} s.")
    write_text(out / "summary.md", markdown_report(result, "Evaluation", intro, notes))
    for note in notes:
        print(f"note: {note}")
    print(markdown_table(result["summary"]))
    print(f"{len(result['rows'])} rows -> {out}/rows.jsonl, report -> {out}/summary.md (with its plots)")
    return 0

"""``recache eval``: schedules x mechanisms x budgets against the uncached output on the held-out protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from recache.cli.options import add_model_options, add_policy_options, load_policy, nonnegative_int, positive_int
from recache.errors import RecacheError
from recache.evaluation import BUDGETS, calibration_pairs, evaluate, heldout_pairs, make_reference
from recache.evaluation.plots import plot_quality_vs_budget
from recache.evaluation.report import markdown_paired_table, markdown_table, paired_comparison, summarize, write_jsonl
from recache.io import write_json, write_text
from recache.mechanisms import MECHANISMS
from recache.models.pretrained import load_classifier
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule, check_budget


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    return values


def _mechanisms(text: str) -> list[str]:
    names = list(MECHANISMS) if text == "all" else text.split(",")
    for name in names:
        if name not in MECHANISMS:
            raise argparse.ArgumentTypeError(f"unknown mechanism {name!r}; choose from {', '.join(MECHANISMS)} or 'all'")
    return names


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate schedules x mechanisms x budgets on held-out seeds")
    add_model_options(p)
    p.add_argument("--budgets", type=_int_list, default=list(BUDGETS), help="uniform-schedule budgets (default: 5,7,10,14,20)")
    p.add_argument("--mechanisms", type=_mechanisms, default=list(MECHANISMS), help="comma-separated, or all (default)")
    p.add_argument("--schedule", action="append", default=[], help="also evaluate this schedule file (repeatable)")
    p.add_argument("--policy", action="append", default=[],
                   help="also evaluate a trained policy (folder or shipped name) at every budget, with its own mechanism (repeatable)")
    add_policy_options(p)
    p.add_argument("--pairs", choices=("heldout", "calibration"), default="heldout",
                   help="held-out seeds (default), or the calibration seeds policies are trained on, to see overfitting")
    p.add_argument("--per-class", type=positive_int, default=10, help="held-out pairs per class (default: 10)")
    p.add_argument("--timing-runs", type=nonnegative_int, default=3, help="same-run timings per row for the speed-up; 0 skips (default: 3)")
    p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipe = DigitPipeline.from_pretrained(args.model, steps=args.steps, guidance=args.guidance, sigmas=args.sigmas)
    for k in args.budgets:
        check_budget(k, pipe.steps)
    jobs = [("uniform", Schedule.uniform(pipe.steps, k), args.mechanisms) for k in args.budgets]
    jobs += [(f"file:{Path(f).stem}", Schedule.load(f, T=pipe.steps, model=pipe.model_id), args.mechanisms) for f in args.schedule]
    policies = [(name, load_policy(name, pipe)) for name in args.policy]
    shared = len({p.config.mechanism for _, p in policies}) < len(policies)  # then the labels name the policies
    for name, policy in policies:
        label = "recache" + ("-nested" if args.nested else "") + (f":{Path(name).name}" if shared else "")
        jobs += [(label, policy.schedule(k, nested=args.nested, allow_extrapolate=args.allow_extrapolate), [policy.config.mechanism])
                 for k in args.budgets]
    if not jobs:
        raise RecacheError("nothing to evaluate: give --budgets or --schedule")
    out = Path(args.out)
    _check_writable(out)
    classifier = load_classifier()
    classes, seeds = heldout_pairs(args.per_class) if args.pairs == "heldout" else calibration_pairs(10 * args.per_class)
    ref = make_reference(pipe, classifier, classes, seeds)
    rows = []
    runs = [(policy, schedule, mechanism) for policy, schedule, mechanisms in jobs for mechanism in mechanisms]
    for policy, schedule, mechanism in tqdm(runs, desc="schedules"):
        rows += evaluate(pipe, classifier, ref, schedule, mechanism, policy, args.timing_runs)[0]
    summary = summarize(rows)
    table = markdown_table(summary)
    comparison = paired_comparison(rows)
    if comparison:
        table += "\nPaired against the uniform schedule at the same mechanism and budget (better / worse: beyond two paired " \
                 "standard errors):\n\n" + markdown_paired_table(comparison)
    write_jsonl(out / "rows.jsonl", rows)
    write_json(out / "summary.json", {"summary": summary, "paired": comparison})
    write_text(out / "summary.md", f"# Evaluation: {pipe.model_id}, T = {pipe.steps}, {len(seeds)} {args.pairs} pairs\n\n"
               "Mean ± standard error over the pairs; metrics against the uncached output from the same noise and class. "
               "FLOPs reduction from torch's FLOP counter; speed-up = median of "
               f"{args.timing_runs} same-run wall-clock ratios against uncached sampling of 16 images (n/a when 0). "
               f"Uncached sampling of the {len(seeds)} pairs took {ref.seconds:.2f} s.\n\n{table}")
    plot_quality_vs_budget(summary, out / "quality_vs_budget.png")
    print(table)
    print(f"{len(rows)} rows -> {out}/rows.jsonl, table -> {out}/summary.md, plot -> {out}/quality_vs_budget.png")
    return 0


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RecacheError(f"output folder {folder} is not writable ({e.strerror})") from None

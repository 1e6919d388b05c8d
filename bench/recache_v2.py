"""ReCache v2's must-shows on the embedded model, on the 100 held-out pairs with paired standard errors (rel. L2):

1. best scheduler: at T = 50 (linear) and k in {5, 7, 10, 14, 20}, the v2 policy against uniform, a default BudCache
   search for that k and the path plan (both resumed from --searches when there, else run into it);
2. iso-quality: the fewest passes at which the policy matches uniform's quality at k = 10 and k = 20;
3. any grid, any T: T in {20, 25, 30, 40, 50} x grids {linear, shifted:3, shifted:2, shifted:1.5} (--steps,
   --grids; T 25, 40 and shifts 2, 1.5 were never trained on: the policy plans them by interpolation between the
   trained settings around them), every budget of the trained fractions: policy against uniform, and where the guard
   fell back, interpolated or (outside the trained range) did not check.

    .venv/bin/python bench/recache_v2.py [--mechanisms taylorseer,hicache] [--policy mnist-dit-{mechanism}]
        [--searches runs/bench/path_planning] [--out runs/bench/recache_v2] [--only grids] [--steps 20,30,50]
    .venv/bin/python bench/recache_v2.py --pipeline mnist-flux --mechanisms taylorseer \
        --policy mnist-flux-taylorseer --out runs/bench/recache_v2_flux      # part 3 on the diffusers FLUX

Writes results.jsonl and recache_v2.md into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recache.io import write_jsonl, write_text
from recache.metrics import relative_l2
from recache.metrics.paired import mean_and_se, paired_difference
from recache.policies import load_policy
from recache.policies.budcache import SearchConfig, search_schedule
from recache.policies.cost_table import TABLE_PAIRS, plan_from_calibration
from recache.protocol import BUDGETS, heldout_pairs
from recache.sampling.diffusers_rollouts import load_rollouts
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import fit_shift, get_sigmas
from recache.schedule import Schedule

GRIDS, STEPS = "linear,shifted:3,shifted:2,shifted:1.5", "20,25,30,40,50"


def errors(pipe, schedules: dict[str, Schedule], mechanism: str, classes, seeds, reference) -> dict[str, torch.Tensor]:
    """Per-pair rel. L2 of each schedule, after checking every realised budget."""
    out, passes = pipe.rollout(classes, seeds, list(schedules.values()), mechanism)
    for (name, s), p in zip(schedules.items(), passes, strict=True):
        assert torch.all(p == s.k), f"{name}: realised {p.tolist()} passes, planned {s.k}"
    return {name: relative_l2(o, reference) for name, o in zip(schedules, out, strict=True)}


def best_scheduler(pipe, mechanism: str, policy, searches: Path, heldout, rows: list) -> list[str]:
    plans = plan_from_calibration(pipe, mechanism, TABLE_PAIRS, list(BUDGETS), searches / f"path-{mechanism}",
                                  resume=True, progress=False)
    lines = [f"| {mechanism} | k | uniform | ReCache v2 | BudCache | path plan | BudCache - v2 | path - v2 |",
             "|---|---|---|---|---|---|---|---|"]
    for k in BUDGETS:
        searched, _ = search_schedule(SearchConfig(k=k, mechanism=mechanism), pipe,
                                      searches / f"search-{mechanism}-k{k}", resume=True, progress=False)
        schedules = {"uniform": Schedule.uniform(50, k), "v2": policy.schedule(k, sigmas=pipe.sigmas),
                     "budcache": searched, "path": plans[k]}
        e = errors(pipe, schedules, mechanism, *heldout)
        diffs = {n: paired_difference(e[n], e["v2"]) for n in ("uniform", "budcache", "path")}
        rows.append({"part": "best", "mechanism": mechanism, "k": k, **{n: v.mean().item() for n, v in e.items()},
                     **{f"{n}_minus_v2": d for n, d in diffs.items()}})
        lines.append(f"| | {k} | {e['uniform'].mean():.4f} | {e['v2'].mean():.4f} | {e['budcache'].mean():.4f} | "
                     f"{e['path'].mean():.4f} | {_diff(diffs['budcache'])} | {_diff(diffs['path'])} |")
    return lines


def iso_quality(pipe, mechanism: str, policy, heldout, rows: list) -> list[str]:
    budgets = list(policy.config.budgets(50))
    schedules = {f"v2-{k}": policy.schedule(k, sigmas=pipe.sigmas) for k in budgets}
    e = errors(pipe, {"uniform-10": Schedule.uniform(50, 10), "uniform-20": Schedule.uniform(50, 20), **schedules},
               mechanism, *heldout)
    lines = []
    for target in (10, 20):
        goal = e[f"uniform-{target}"].mean().item()
        needed = next((k for k in budgets if e[f"v2-{k}"].mean().item() <= goal), None)
        rows.append({"part": "iso", "mechanism": mechanism, "uniform_k": target, "uniform": goal, "v2_k": needed})
        lines.append(f"- {mechanism}: uniform at k = {target} has rel. L2 {goal:.4f}; v2 reaches it with "
                     f"{needed if needed else 'more than ' + str(budgets[-1])} passes")
    return lines


def on_grid(base, T: int, grid: str, classes, seeds):
    """The sampler of ``base`` for ``T`` steps on ``grid``, its uncached outputs and the grid it ran (a diffusers
    pipeline's from its scheduler)."""
    if isinstance(base, DigitPipeline):
        pipe = DigitPipeline(base.model, get_sigmas(grid, T), base.guidance, base.model_id, grid)
        return pipe, pipe(classes, seeds), pipe.sigmas
    pipe = base.with_grid(T, fit_shift(get_sigmas(grid, T))[0])
    return pipe, pipe(classes, seeds), pipe.sigmas


def grids(base, mechanism: str, policy, heldout_classes, heldout_seeds, rows: list, steps: list[int],
          names: list[str]) -> list[str]:
    lines = [f"| {mechanism} | T | grid | budgets | v2 better | tie | worse (> 2 SE) | guard: uniform kept | "
             "interpolated | not checked |", "|---|---|---|---|---|---|---|---|---|---|"]
    for T in steps:
        for grid in names:
            pipe, reference, sigmas = on_grid(base, T, grid, heldout_classes, heldout_seeds)
            counts, kept, between, unchecked = {"better": 0, "tie": 0, "worse": 0}, [], [], []
            for k in policy.config.budgets(T):
                learned = policy.schedule(k, sigmas=sigmas, allow_extrapolate=not policy.covers(k, sigmas))
                e = errors(pipe, {"uniform": Schedule.uniform(T, k), "v2": learned}, mechanism, heldout_classes,
                           heldout_seeds, reference)
                d, se = paired_difference(e["v2"], e["uniform"])
                verdict = "better" if d < -2 * se else "worse" if d > 2 * se else "tie"
                counts[verdict] += 1
                kept += [k] if learned.metadata.get("fallback") else []
                between += [k] if learned.metadata["guard"] == "interpolated" else []
                unchecked += [k] if learned.metadata["guard"] == "not checked" else []
                rows.append({"part": "grid", "mechanism": mechanism, "T": T, "grid": grid, "k": k,
                             "uniform": e["uniform"].mean().item(), "v2": e["v2"].mean().item(), "diff": d, "se": se,
                             "verdict": verdict, "guard": learned.metadata["guard"]})
            budgets = policy.config.budgets(T)
            lines.append(f"| | {T} | {grid} | {budgets.start}-{budgets.stop - 1} | {counts['better']} | "
                         f"{counts['tie']} | {counts['worse']} | {_list(kept)} | {_list(between)} | "
                         f"{_list(unchecked)} |")
    return lines


def _diff(d: tuple[float, float]) -> str:
    return f"{d[0]:+.4f} ± {d[1]:.4f}" + (" (v2 better)" if d[0] > 2 * d[1] else " (v2 worse)" if d[0] < -2 * d[1]
                                          else "")


def _list(ks: list[int]) -> str:
    return ", ".join(map(str, ks)) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mechanisms", default="taylorseer,hicache")
    p.add_argument("--policy", default="mnist-dit-{mechanism}", help="policy folder or name, {mechanism} filled in")
    p.add_argument("--searches", default="runs/bench/path_planning", help="BudCache searches and cost tables")
    p.add_argument("--pipeline", default=None,
                   help="a diffusers pipeline (mnist-flux): part 3 only, on the 50 held-out pairs of "
                        "bench/diffusers_caches.py")
    p.add_argument("--out", default="runs/bench/recache_v2")
    p.add_argument("--only", choices=("grids",), default=None, help="run part 3 only")
    p.add_argument("--steps", default=STEPS, help=f"part 3's step counts (default: {STEPS})")
    p.add_argument("--grids", default=GRIDS, help=f"part 3's grids (default: {GRIDS})")
    args = p.parse_args()
    steps, names = [int(T) for T in args.steps.split(",")], args.grids.split(",")
    out, searches = Path(args.out), Path(args.searches)
    torch.manual_seed(0)
    base = DigitPipeline.from_pretrained() if args.pipeline is None else load_rollouts(args.pipeline)
    classes, seeds = heldout_pairs() if args.pipeline is None else heldout_pairs(5)
    heldout = (classes, seeds, base(classes, seeds))
    rows, best, iso, grid = [], [], [], []
    for mechanism in args.mechanisms.split(","):
        policy = load_policy(args.policy.format(mechanism=mechanism), mechanism=mechanism)
        if args.pipeline is None and args.only is None:
            best += best_scheduler(base, mechanism, policy, searches, heldout, rows)
            iso += iso_quality(base, mechanism, policy, heldout, rows)
        grid += grids(base, mechanism, policy, classes, seeds, rows, steps, names)
        write_jsonl(out / "results.jsonl", rows)
    text = [f"# ReCache v2 (bench/recache_v2.py{' --pipeline ' + args.pipeline if args.pipeline else ''})", "",
            f"Held-out pairs ({len(seeds)}), rel. L2 to the uncached output, paired SE; differences are other - v2 "
            "(positive: v2 better).", ""]
    if best:
        mean, se = mean_and_se(torch.tensor([r["v2"] for r in rows if r["part"] == "best"]))
        text += ["## Best scheduler, T = 50, linear", "", *best, "", f"(v2 over these rows: mean rel. L2 {mean:.4f} "
                 f"± {se:.4f})", "", "## Iso-quality", "", *iso, ""]
    text += ["## Any grid, any T", "", *grid, ""]
    write_text(out / "recache_v2.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()

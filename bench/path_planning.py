"""Path planning on the embedded model at T = 50: a cost table per mechanism, the plans for every budget 4..25, how
well segment costs add up to the error of whole schedules, and the planned schedules against uniform, BudCache
searches and the shipped ReCache policies on the 100 held-out pairs (paired standard errors).

    .venv/bin/python bench/path_planning.py [--mechanisms taylorseer,hicache,reuse] [--budgets 5,7,10,14,20]
        [--search-mechanisms taylorseer,hicache] [--random 300] [--out runs/bench/path_planning]

Resumable: the cost tables and searches in --out are completed, not repeated (their times are then those of the
first run, kept in timings.json). Writes results.jsonl, path_planning.md and additivity.png into --out.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from recache.io import atomic_path, read_json, write_json, write_jsonl, write_text  # noqa: E402
from recache.mechanisms import get_mechanism  # noqa: E402
from recache.metrics import classifier_scores, relative_l2  # noqa: E402
from recache.metrics.paired import paired_difference  # noqa: E402
from recache.models.pretrained import load_classifier  # noqa: E402
from recache.policies import load_policy, shipped_policies  # noqa: E402
from recache.policies.budcache import SearchConfig, rollout_objective, search_schedule  # noqa: E402
from recache.policies.cost_table import (  # noqa: E402
    TABLE,
    TABLE_PAIRS,
    load_table,
    plan_from_calibration,
    segment_count,
)
from recache.policies.path_planning import path_cost, plan_schedules  # noqa: E402
from recache.protocol import calibration_pairs, heldout_pairs  # noqa: E402
from recache.sampling.pipeline import DigitPipeline  # noqa: E402
from recache.schedule import Schedule  # noqa: E402

PAIRS, ALL_BUDGETS = TABLE_PAIRS, list(range(4, 26))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def plan_all(pipe, mechanism: str, out: Path, timings: dict) -> tuple[dict[int, Schedule], torch.Tensor]:
    """The table and the plans for budgets 4..25 (timed the first time), and the time to plan one more budget."""
    folder = out / f"path-{mechanism}"
    plans, seconds = timed(lambda: plan_from_calibration(pipe, mechanism, PAIRS, ALL_BUDGETS, folder,
                                                         resume=True))
    timings.setdefault(f"table {mechanism}", seconds)
    cost = load_table(folder / TABLE)[0]
    timings[f"new budget {mechanism}"] = min(timed(lambda: plan_schedules(cost, [13]))[1] for _ in range(5))
    return plans, cost


def additivity(pipe, mechanism: str, cost: torch.Tensor, count: int) -> dict:
    """True calibration MSE against the planner's summed segment costs for ``count`` random schedules (k in 4..25,
    seeded), on the table's own pairs: Spearman rank correlation overall and within each budget."""
    rng, T = random.Random(0), pipe.steps
    candidates = [(0, *sorted(rng.sample(range(1, T), k - 1))) for k in (rng.choice(ALL_BUDGETS) for _ in range(count))]
    classes, seeds = calibration_pairs(PAIRS)
    objective = rollout_objective(pipe, get_mechanism(mechanism), classes, seeds, pipe(classes, seeds), chunk=32)
    true = torch.tensor(objective(candidates), dtype=torch.float64)
    predicted = torch.tensor([path_cost(cost, c) for c in candidates], dtype=torch.float64)
    within = [spearman(true[idx], predicted[idx]) for k in ALL_BUDGETS
              if len(idx := [i for i, c in enumerate(candidates) if len(c) == k]) >= 5]
    return {"mechanism": mechanism, "schedules": count, "spearman": spearman(true, predicted),
            "spearman_within_k": sum(within) / len(within), "true": true.tolist(), "predicted": predicted.tolist(),
            "ratio_median": (true / predicted.clamp_min(1e-12)).median().item()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def searched(pipe, mechanism: str, k: int, out: Path, timings: dict, start: Schedule | None = None) -> Schedule:
    """BudCache's search with the default settings, from a random start or from ``start`` (the plan)."""
    config = SearchConfig(k=k, mechanism=mechanism, start=tuple(start.steps) if start is not None else None)
    name = f"{'planned-' if start is not None else ''}search {mechanism} k{k}"
    (schedule, _), seconds = timed(lambda: search_schedule(config, pipe, out / name.replace(" ", "-"),
                                                           resume=True, progress=False))
    timings.setdefault(name, seconds)
    timings[f"evaluations {name}"] = schedule.metadata["evaluations"]
    return schedule


def per_pair(pipe, classifier, schedule: Schedule, mechanism: str, held: dict) -> dict:
    images, passes = pipe.sample_with(schedule, mechanism, held["classes"], held["seeds"])
    if not bool((passes == schedule.k).all()):
        raise RuntimeError(f"{schedule.k} passes asked, {passes.tolist()} realised")
    scores = classifier_scores(classifier, images, held["classes"], held["features"])
    return {"steps": list(schedule.steps), "rel_l2": relative_l2(images, held["ref"]).tolist(),
            "feature_distance": scores["feature_distance"].tolist()}


def evaluate(pipe, args, plans: dict, out: Path, timings: dict) -> list[dict]:
    classifier, (classes, seeds) = load_classifier(), heldout_pairs()
    ref = pipe(classes, seeds)
    held = {"classes": classes, "seeds": seeds, "ref": ref,
            "features": classifier.features(ref)}
    rows = []
    for mechanism in args.mechanisms:
        policy = load_policy(f"mnist-dit-{mechanism}") if f"mnist-dit-{mechanism}" in shipped_policies() else None
        for k in args.budgets:
            methods = {"uniform": Schedule.uniform(pipe.steps, k), "path": plans[mechanism][k]}
            if policy is not None:
                methods["recache"] = policy.schedule(k, sigmas=pipe.sigmas)
            if mechanism in args.search_mechanisms:
                methods["budcache"] = searched(pipe, mechanism, k, out, timings)
                methods["path+budcache"] = searched(pipe, mechanism, k, out, timings, start=plans[mechanism][k])
            rows += [{"method": name, "mechanism": mechanism, "k": k,
                      **per_pair(pipe, classifier, schedule, mechanism, held)} for name, schedule in methods.items()]
            write_jsonl(out / "results.jsonl", rows)
    return rows


def _cell(values: dict, names: list[str], metric: str, digits: int) -> str:
    means = {n: sum(values[n][metric]) / len(values[n][metric]) for n in names if n in values}
    best = min(means.values())
    return " / ".join((f"**{v:.{digits}f}**" if v == best else f"{v:.{digits}f}") if n in means else "-"
                      for n, v in ((n, means.get(n)) for n in names))


def _diff(values: dict, a: str, b: str, metric: str, digits: int) -> str:
    if a not in values or b not in values:
        return "-"
    mean, se = paired_difference(torch.tensor(values[a][metric]), torch.tensor(values[b][metric]))
    verdict = "tie" if abs(mean) <= 2 * se else (f"{a} better" if mean < 0 else f"{b} better")
    return f"{mean:+.{digits}f} ± {se:.{digits}f} ({verdict})"


def comparison_table(rows: list[dict], names: list[str]) -> list[str]:
    lines = [f"| mechanism | k | rel. L2: {' / '.join(names)} | path - uniform | path - budcache | path - recache "
             f"| path+budcache - budcache | feature dist.: {' / '.join(names)} | path - uniform, feature dist. |",
             "|---" * 9 + "|"]
    keys = list(dict.fromkeys((r["mechanism"], r["k"]) for r in rows))
    for mechanism, k in keys:
        values = {r["method"]: r for r in rows if (r["mechanism"], r["k"]) == (mechanism, k)}
        diffs = [_diff(values, "path", other, "rel_l2", 4) for other in ("uniform", "budcache", "recache")]
        diffs.append(_diff(values, "path+budcache", "budcache", "rel_l2", 4))
        lines.append(f"| {mechanism} | {k} | {_cell(values, names, 'rel_l2', 4)} | {' | '.join(diffs)} "
                     f"| {_cell(values, names, 'feature_distance', 2)} "
                     f"| {_diff(values, 'path', 'uniform', 'feature_distance', 2)} |")
    return lines


def cost_lines(args, timings: dict, fits: list[dict], T: int) -> list[str]:
    lines = ["| mechanism | cost table + plans for k = 4..25 | rollouts | one more budget | Spearman, "
             "all / within k |", "|---|---|---|---|---|"]
    for fit in fits:
        m = fit["mechanism"]
        lines.append(f"| {m} | {timings[f'table {m}']:.0f} s | {segment_count(T) * PAIRS:,} "
                     f"({PAIRS} pairs) | {1000 * timings[f'new budget {m}']:.1f} ms | "
                     f"{fit['spearman']:.3f} / {fit['spearman_within_k']:.3f} |")
    searches = [(k, v) for k, v in timings.items() if "search " in k and not k.startswith("evaluations")]
    if searches:
        lines += ["", "BudCache searches (default settings, 8 calibration pairs; planned-: started from the plan): "
                  + ", ".join(f"{k} {v:.0f} s ({timings['evaluations ' + k]} schedules)" for k, v in searches)]
    return lines


def plot_additivity(fits: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for fit in fits:
        ax.scatter(fit["predicted"], fit["true"], s=6, label=f"{fit['mechanism']} (Spearman {fit['spearman']:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="sum of segment costs (planner)",
           ylabel="true calibration MSE of the schedule", title="Do segment costs add up?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", default="taylorseer,hicache,reuse")
    parser.add_argument("--search-mechanisms", default="taylorseer,hicache")
    parser.add_argument("--budgets", default="5,7,10,14,20")
    parser.add_argument("--random", type=int, default=300)
    parser.add_argument("--out", default="runs/bench/path_planning")
    args = parser.parse_args()
    args.mechanisms, args.search_mechanisms = args.mechanisms.split(","), args.search_mechanisms.split(",")
    args.budgets = [int(k) for k in args.budgets.split(",")]
    out, pipe = Path(args.out), DigitPipeline.from_pretrained("mnist-dit")
    timings = read_json(out / "timings.json", "timings") if (out / "timings.json").exists() else {}
    plans, fits = {}, []
    for mechanism in args.mechanisms:
        plans[mechanism], cost = plan_all(pipe, mechanism, out, timings)
        write_json(out / "timings.json", timings)
        fits.append(additivity(pipe, mechanism, cost, args.random))
        print(f"{mechanism}: table {timings[f'table {mechanism}']:.0f} s, Spearman {fits[-1]['spearman']:.3f}")
    rows = evaluate(pipe, args, plans, out, timings)
    write_json(out / "timings.json", timings)
    plot_additivity(fits, out / "additivity.png")
    names = ["uniform", "recache", "budcache", "path", "path+budcache"]
    text = "\n".join(["# Path planning on mnist-dit (T = 50), 100 held-out pairs", "", *cost_lines(args, timings, fits,
                      pipe.steps), "", *comparison_table(rows, names), "",
                      "Plans: " + "; ".join(f"{m} k={k}: {list(plans[m][k].steps)}" for m in args.mechanisms
                                            for k in args.budgets)])
    write_text(out / "path_planning.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()

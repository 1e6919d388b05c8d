"""recache against diffusers' own caches on a trained FLUX (the shipped ``mnist-flux``), at equal realised passes.

Every method runs inside the same ``diffusers.FluxPipeline`` (true CFG: a "cond" and an "uncond" transformer call
per step) on held-out (class, seed) pairs, and is compared with the uncached output from the same noise and class:
relative L2, PSNR and the digit classifier's feature distance (± SE over the pairs), realised full passes per
branch (counted from the last block's attention query projections, the same counter for every method) and wall
time (median of ``--runs`` timed calls of the whole held-out batch; speed-up against the uncached median of the
same runs).

- ours: uniform schedules (``reuse``, ``taylorseer``), a BudCache-searched ``taylorseer`` schedule (searched here
  on ``--search-pairs`` calibration pairs with at most 5 hill-climbing moves, unless ``--search-dir`` holds it), the
  path plan on a ``taylorseer`` cost table of ``--path-pairs`` calibration pairs (``recache search --method path``)
  and the shipped ReCache policy ``mnist-flux-taylorseer`` (trained on this pipeline with
  ``recache train --pipeline mnist-flux``);
- diffusers 0.42's: ``FirstBlockCacheConfig`` (threshold bisected on calibration seeds to the budget),
  ``MagCacheConfig`` (ratios calibrated on this model with ``calibrate=True``, then threshold bisected; retention
  0.1 and no cap on consecutive skips, so that small budgets are reachable),
  ``TaylorSeerCacheConfig`` (interval and warm-up chosen to realise the budget; default mode forecasts the
  attention outputs and still runs the MLPs on cached steps, lite mode skips whole blocks).

    .venv/bin/python bench/diffusers_caches.py [--budgets 7,10] [--runs 3] [--per-class 5] [--only 'path plan']
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig  # noqa: E402

import recache  # noqa: E402
from recache.io import write_text  # noqa: E402
from recache.metrics.fidelity import psnr, relative_l2  # noqa: E402
from recache.metrics.paired import mean_and_se, paired_difference  # noqa: E402
from recache.models.flux_digits import FluxDigitsPipeline  # noqa: E402
from recache.models.pretrained import load_classifier  # noqa: E402
from recache.policies.budcache import SCHEDULE, SearchConfig, search_schedule  # noqa: E402
from recache.policies.cost_table import plan_from_calibration  # noqa: E402
from recache.policies.noise_level import load_policy  # noqa: E402
from recache.protocol import calibration_pairs, heldout_pairs  # noqa: E402
from recache.sampling.diffusers_rollouts import load_rollouts  # noqa: E402
from recache.schedule import Schedule  # noqa: E402

CALIBRATION = 16  # calibration pairs for thresholds (seeds 0..15, never held out)


class PassCounter:
    """Counts the query projections of the last block's attention: one per full pass of one CFG branch, whatever the
    cache (a skipped block never reaches them, nor does an attention whose output TaylorSeerCache forecasts)."""

    def __init__(self, transformer):
        last = (transformer.single_transformer_blocks[-1] if len(transformer.single_transformer_blocks)
                else transformer.transformer_blocks[-1])
        self.calls = 0
        last.attn.to_q.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def per_branch(self, fn) -> float:
        self.calls = 0
        fn()
        return self.calls / 2  # true CFG: a cond and an uncond call per step


def ours(schedule: Schedule, mechanism: str):
    return lambda pipe: recache.enable(pipe, schedule=schedule, mechanism=mechanism), recache.disable


def learned(policy, k: int):
    """The policy through ``recache.enable``, as a user runs it: it plans for the grid the scheduler reports."""
    return lambda pipe: recache.enable(pipe, k, policy=policy), recache.disable


def theirs(config):
    return lambda pipe: pipe.transformer.enable_cache(config), lambda pipe: pipe.transformer.disable_cache()


def realised(digits, counter, setup, classes, seeds) -> float:
    enable, disable = setup
    enable(digits.pipe)
    try:
        return counter.per_branch(lambda: digits(classes, seeds))
    finally:
        disable(digits.pipe)


def bisect_threshold(make, digits, counter, k, classes, seeds, lo=0.0, hi=4.0, iters=14) -> tuple[float, float]:
    """The threshold whose mean realised passes on the calibration pairs is closest to ``k`` (passes fall as it
    grows)."""
    best = (float("inf"), hi, None)
    for _ in range(iters):
        mid = (lo + hi) / 2
        passes = realised(digits, counter, theirs(make(mid)), classes, seeds)
        best = min(best, (abs(passes - k), mid, passes))
        if abs(passes - k) < 0.5:
            break
        lo, hi = (mid, hi) if passes > k else (lo, mid)
    return best[1], best[2]


def mag_ratios(digits, classes, seeds) -> list[float]:
    """MagCache's calibration run on this model: it prints one ratio list per branch at the end; we average them."""
    config = MagCacheConfig(calibrate=True, num_inference_steps=digits.steps)
    digits.transformer.enable_cache(config)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            digits(classes, seeds)
    finally:
        digits.transformer.disable_cache()
    lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines()
             if line.startswith("[") and not line.startswith("[MagCache]")]
    return [statistics.fmean(values) for values in zip(*lists, strict=True)]


def taylorseer_config(digits, counter, k, classes, seeds, lite: bool):
    """The (interval, warm-up) whose realised passes are closest to ``k``, preferring diffusers' default warm-up 3."""
    best = None
    for warmup in (3, 2, 1, 4):
        for interval in range(2, digits.steps):
            config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1,
                                           taylor_factors_dtype=torch.float32, use_lite_mode=lite)
            passes = realised(digits, counter, theirs(config), classes[:1], seeds[:1])
            if best is None or abs(passes - k) < best[0]:
                best = (abs(passes - k), config, passes)
            if passes < k:  # passes only fall as the interval grows
                break
        if best[0] == 0:
            break
    return best[1]


def evaluate(name, family, setup, digits, counter, classes, seeds, reference, ref_features, classifier, runs,
             base_seconds):
    """Quality of the first of ``runs`` timed calls (all are identical), the median time and the realised passes."""
    enable, disable = setup
    enable(digits.pipe)
    seconds, images = [], None
    counter.calls = 0
    try:
        for _ in range(runs):
            start = time.perf_counter()
            out = digits(classes, seeds)
            seconds.append(time.perf_counter() - start)
            images = out if images is None else images
    finally:
        disable(digits.pipe)
    passes = counter.calls / 2 / runs  # true CFG: a cond and an uncond call per step
    with torch.no_grad():
        distance = (classifier.features(images) - ref_features).norm(dim=1)
    row = {"method": name, "family": family, "realised_passes": passes, "seconds": statistics.median(seconds)}
    row["speedup"] = base_seconds / row["seconds"]
    for metric, values in (("rel_l2", relative_l2(images, reference)), ("psnr", psnr(images, reference)),
                           ("feature_distance", distance)):
        row[metric], row[metric + "_se"] = mean_and_se(values)
        row[metric + "_pairs"] = values.tolist()
    print(f"  {name:<44} passes {passes:5.1f}  rel-L2 {row['rel_l2']:.4f}  "
          f"feature distance {row['feature_distance']:.3f}  {row['speedup']:.2f}x", flush=True)
    return row


def table(rows: list[dict], T: int) -> str:
    lines = [f"| budget | method | realised passes / branch (of {T}) | rel-L2 | PSNR dB | feature distance | wall s | "
             "speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['method']} | {r['realised_passes']:.1f} | "
                     f"{r['rel_l2']:.4f} ± {r['rel_l2_se']:.4f} | {r['psnr']:.1f} | "
                     f"{r['feature_distance']:.3f} ± {r['feature_distance_se']:.3f} | {r['seconds']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n" + paired(rows)


def paired(rows: list[dict]) -> str:
    """ReCache's rel-L2 minus each other recache schedule's at the same budget, on the same pairs (± paired SE;
    negative: ReCache is closer to the uncached output)."""
    lines = ["", "| budget | ReCache rel-L2 minus | difference ± paired SE | in SE |", "|---|---|---|---|"]
    for k in dict.fromkeys(r["budget"] for r in rows):
        at_k = {r["method"]: r for r in rows if r["budget"] == k}
        mine = at_k.get("ReCache learned / taylorseer")
        for name, other in at_k.items() if mine else ():
            if other["family"] == "recache" and other is not mine and "taylorseer" in name:
                diff, se = paired_difference(torch.tensor(mine["rel_l2_pairs"]), torch.tensor(other["rel_l2_pairs"]))
                lines.append(f"| {k} | {name} | {diff:+.4f} ± {se:.4f} | {diff / max(se, 1e-12):+.1f} |")
    return "\n".join(lines) + "\n" if len(lines) > 3 else ""


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family, marker in (("recache", "o"), ("diffusers", "s")):
        picked = [r for r in rows if r["family"] == family]
        for ax, x in zip(axes, ("realised_passes", "speedup"), strict=True):
            ax.scatter([r[x] for r in picked], [r["feature_distance"] for r in picked], marker=marker, label=family)
            for r in picked:
                ax.annotate(r["method"], (r[x], r["feature_distance"]), fontsize=6)
    axes[0].set_xlabel("realised full passes per CFG branch")
    axes[1].set_xlabel("measured speed-up over uncached")
    for ax in axes:
        ax.set_ylabel("feature distance to uncached (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="7,10", help="full passes per branch, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--per-class", type=int, default=5, help="held-out pairs per digit")
    parser.add_argument("--policy", default="mnist-flux-taylorseer", help="the ReCache policy trained on mnist-flux")
    parser.add_argument("--search-dir", default="runs/bench/diffusers_caches/search",
                        help="BudCache searches (reused if present)")
    parser.add_argument("--search-pairs", type=int, default=32,
                        help="calibration pairs of the BudCache searches (8 overfits here)")
    parser.add_argument("--path-pairs", type=int, default=4, help="calibration pairs of the path plan's cost table")
    parser.add_argument("--only", type=lambda t: t.split(","), default=None,
                        help="evaluate only these methods (comma-separated names or families, e.g. 'path plan')")
    parser.add_argument("--out", default="runs/bench/diffusers_caches")
    return parser.parse_args()


def methods_at_budget(k, args, digits, counter, policy, ratios, cal_classes, cal_seeds) -> list[tuple]:
    """The (name, family, setup) of every method at budget ``k`` whose name contains one of ``--only``: recache's
    schedules (the BudCache one searched unless ``--search-dir`` holds it, the path plan on a cost table measured
    once in ``--out``) and diffusers' caches calibrated to ``k`` on the calibration pairs. Each is built only when
    it is kept, so a run of a few methods pays no search or calibration for the others."""
    T = digits.steps
    magcache = lambda t: MagCacheConfig(threshold=t, mag_ratios=ratios, num_inference_steps=T,  # noqa: E731
                                        max_skip_steps=T, retention_ratio=0.1)
    def bisect(make, **kw) -> float:
        return bisect_threshold(make, digits, counter, k, cal_classes, cal_seeds, **kw)[0]

    makers = [
        ("uniform / reuse", "recache", lambda: ours(Schedule.uniform(T, k), "reuse")),
        ("uniform / taylorseer", "recache", lambda: ours(Schedule.uniform(T, k), "taylorseer")),
        ("BudCache searched / taylorseer", "recache", lambda: ours(searched_schedule(k, args, T), "taylorseer")),
        ("path plan / taylorseer", "recache", lambda: ours(planned_schedule(k, args, T), "taylorseer")),
        ("ReCache learned / taylorseer", "recache", lambda: learned(policy, k)),
        ("FirstBlockCache", "diffusers", lambda: FirstBlockCacheConfig(threshold=bisect(
            lambda t: FirstBlockCacheConfig(threshold=t)))),
        ("MagCache", "diffusers", lambda: magcache(bisect(magcache, hi=8.0))),
        ("TaylorSeerCache", "diffusers", lambda: taylorseer_config(digits, counter, k, cal_classes, cal_seeds, False)),
        ("TaylorSeerCache lite", "diffusers",
         lambda: taylorseer_config(digits, counter, k, cal_classes, cal_seeds, True)),
    ]
    kept = [(name, family, make) for name, family, make in makers
            if not args.only or any(part == name or part in name.split(" / ")[0] for part in args.only)]
    return [(_label(name, built), family, built if family == "recache" else theirs(built))
            for name, family, built in ((n, f, make()) for n, f, make in kept)]


def _label(name: str, built) -> str:
    """A diffusers cache's name with the settings it was calibrated to."""
    if isinstance(built, TaylorSeerCacheConfig):
        return f"{name} (interval {built.cache_interval}, warm-up {built.disable_cache_before_step})"
    if isinstance(built, FirstBlockCacheConfig | MagCacheConfig):
        return f"{name} (threshold {built.threshold:.3g})"
    return name


def searched_schedule(k: int, args, T: int) -> Schedule:
    search_dir = Path(args.search_dir) / f"taylorseer-k{k}-p{args.search_pairs}"
    if (search_dir / SCHEDULE).exists():
        return Schedule.load(search_dir / SCHEDULE, T=T)
    config = SearchConfig(k=k, mechanism="taylorseer", pairs=args.search_pairs, hc_iters=5)
    return search_schedule(config, load_rollouts("mnist-flux", steps=T), search_dir, resume=True)[0]


def planned_schedule(k: int, args, T: int) -> Schedule:
    """The path plan for ``k`` on a cost table of ``--path-pairs`` calibration pairs (measured once, then reused)."""
    budgets = [int(b) for b in args.budgets.split(",")]
    folder = Path(args.out) / f"path-p{args.path_pairs}"
    return plan_from_calibration(load_rollouts("mnist-flux", steps=T), "taylorseer", args.path_pairs, budgets,
                                 folder, resume=True)[k]


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    digits = FluxDigitsPipeline.from_pretrained("mnist-flux")
    digits.pipe.set_progress_bar_config(disable=True)
    T, counter, classifier = digits.steps, PassCounter(digits.transformer), load_classifier()
    classes, seeds = heldout_pairs(args.per_class)
    cal_classes, cal_seeds = calibration_pairs(CALIBRATION)
    reference = digits(classes, seeds)
    with torch.no_grad():
        ref_features = classifier.features(reference)
    uncached = []
    for _ in range(args.runs):
        start = time.perf_counter()
        digits(classes, seeds)
        uncached.append(time.perf_counter() - start)
    base = statistics.median(uncached)
    print(f"mnist-flux, T = {T}, guidance {digits.guidance}, {len(seeds)} held-out pairs; "
          f"uncached {base:.2f} s (median of {args.runs})")
    policy = load_policy(args.policy)
    ratios = mag_ratios(digits, cal_classes, cal_seeds)
    rows = []
    for k in [int(b) for b in args.budgets.split(",")]:
        print(f"k = {k} of {T}", flush=True)
        methods = methods_at_budget(k, args, digits, counter, policy, ratios, cal_classes, cal_seeds)
        for name, family, setup in methods:
            row = evaluate(name, family, setup, digits, counter, classes, seeds, reference, ref_features, classifier,
                           args.runs, base)
            rows.append({"budget": k, **row})
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(out / "table.md", table(rows, T))
    plot(rows, out / "quality_vs_cost.png")
    print(table(rows, T))
    print(f"-> {out / 'results.jsonl'}, {out / 'table.md'}, {out / 'quality_vs_cost.png'}")


if __name__ == "__main__":
    main()

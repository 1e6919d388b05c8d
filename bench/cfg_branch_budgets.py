"""One budget per CFG branch on mnist-flux: at the same total of full passes per image (both branches together), is
it better to give the unconditional branch fewer (``recache.enable(pipe, budget, uncond_budget=...)``)?

    .venv/bin/python bench/cfg_branch_budgets.py [--total 20] [--per-class 5] [--mechanism taylorseer]
        [--out runs/bench/cfg_branch_budgets]

Uniform schedules per branch; the held-out pairs of ``bench/diffusers_caches.py`` (true CFG 4, T = 50); relative L2
to the uncached output and its paired difference to the even split. Realised passes come from ``recache.summary``.
Writes results.jsonl and table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import recache
from recache.io import write_text
from recache.metrics.fidelity import relative_l2
from recache.metrics.paired import mean_and_se, paired_difference
from recache.models.flux_digits import FluxDigitsPipeline
from recache.protocol import heldout_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=20, help="full passes per image, both branches together")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--mechanism", default="taylorseer")
    parser.add_argument("--out", default="runs/bench/cfg_branch_budgets")
    args = parser.parse_args()
    digits = FluxDigitsPipeline.from_pretrained("mnist-flux")
    digits.pipe.set_progress_bar_config(disable=True)
    classes, seeds = heldout_pairs(args.per_class)
    reference = digits(classes, seeds)
    even, rows = args.total // 2, []
    errors = {}
    for uncond in range(even, 2, -2):
        cond = args.total - uncond
        recache.enable(digits.pipe, cond, uncond_budget=uncond, mechanism=args.mechanism)
        try:
            errors[uncond] = relative_l2(digits(classes, seeds), reference)
            last = recache.summary(digits.pipe).last
        finally:
            recache.disable(digits.pipe)
        realised = {ctx: len(r["computed_steps"]) for ctx, r in last.items()}
        mean, se = mean_and_se(errors[uncond])
        diff, diff_se = paired_difference(errors[uncond], errors[even])
        rows.append({"cond": cond, "uncond": uncond, "realised": realised, "rel_l2": mean, "se": se,
                     "minus_even": diff, "minus_even_se": diff_se})
        print(rows[-1], flush=True)
    lines = [f"mnist-flux, T = {digits.steps}, true CFG {digits.guidance}, {len(seeds)} held-out pairs, "
             f"{args.mechanism}, uniform schedules, {args.total} full passes per image", "",
             "| cond / uncond passes (realised) | rel. L2 | minus the even split |", "|---|---|---|"]
    lines += [f"| {r['realised']['cond']} / {r['realised']['uncond']} | {r['rel_l2']:.4f} ± {r['se']:.4f} "
              f"| {r['minus_even']:+.4f} ± {r['minus_even_se']:.4f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

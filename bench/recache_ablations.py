"""ReCache ablations: the quality weight alpha (fidelity against quality, the analogue of the paper's Fig. 3) and
the entropy coefficient beta (its Fig. 7). Each setting trains one policy (default settings otherwise), then its
schedules are scored on the held-out pairs at a few budgets against the uncached output.

    .venv/bin/python bench/recache_ablations.py [--alphas 0,0.01,0.05,0.2] [--entropies 0,0.01,0.1]
        [--mechanism taylorseer]

Runs are resumable: a finished setting is kept in --out and skipped. Writes results.jsonl, ablations.md and
ablations.png into --out.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from recache.io import (  # noqa: E402
    atomic_path,
    write_jsonl,  # noqa: E402
    write_text,
)
from recache.metrics import classifier_scores, relative_l2  # noqa: E402
from recache.models.pretrained import load_classifier  # noqa: E402
from recache.policies import ReCachePolicy  # noqa: E402
from recache.policies.reinforce import TrainConfig  # noqa: E402
from recache.policies.training import POLICY, train_recache  # noqa: E402
from recache.protocol import heldout_pairs  # noqa: E402
from recache.sampling.pipeline import DigitPipeline  # noqa: E402
from recache.schedule import Schedule  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def score(pipe, classifier, schedule, mechanism, classes, seeds, ref, ref_features) -> dict:
    images, passes = pipe.sample_with(schedule, mechanism, classes, seeds)
    s = classifier_scores(classifier, images, classes, ref_features)
    return {"k": schedule.k, "realised_k": passes.float().mean().item(),
            "rel_l2": relative_l2(images, ref).mean().item(),
            "feature_distance": s["feature_distance"].mean().item(), "class_logprob": s["class_logprob"].mean().item(),
            "class_acc": s["class_correct"].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=_floats, default=[0.0, 0.01, 0.05, 0.2])
    parser.add_argument("--entropies", type=_floats, default=[0.0, 0.01, 0.1])
    parser.add_argument("--mechanism", default="taylorseer")
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--out", default="runs/bench/recache_ablations")
    args = parser.parse_args()
    out, base = Path(args.out), TrainConfig(mechanism=args.mechanism)
    settings = [("alpha", a, replace(base, alpha=a)) for a in args.alphas]
    # a setting met twice is trained once
    settings += [("entropy", b, replace(base, entropy=b)) for b in args.entropies]
    pipe, classifier = DigitPipeline.from_pretrained(), load_classifier()
    classes, seeds = heldout_pairs()
    ref = pipe(classes, seeds)
    with torch.no_grad():
        ref_features = classifier.features(ref)
    budgets = [int(k) for k in args.budgets.split(",")]
    rows = [{"sweep": "uniform", "value": None,
             **score(pipe, classifier, Schedule.uniform(pipe.steps, k), args.mechanism, classes, seeds,
                     ref, ref_features)} for k in budgets]
    for sweep, value, config in settings:
        folder = out / f"alpha{config.alpha:g}-entropy{config.entropy:g}"
        if not (folder / POLICY / "config.json").exists():
            train_recache(config, folder, pipe, resume=True)
        policy = ReCachePolicy.from_pretrained(folder / POLICY)
        rows += [{"sweep": sweep, "value": value, "alpha": config.alpha, "entropy": config.entropy,
                  **score(pipe, classifier, policy.schedule(k), args.mechanism, classes, seeds, ref, ref_features)}
                 for k in budgets]
        print(json.dumps(rows[-len(budgets):]))
    write_jsonl(out / "results.jsonl", rows)
    lines = ["| sweep | value | k | rel. L2 | feature dist. | log p(class) | class acc. |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sweep']} | {'' if r['value'] is None else format(r['value'], 'g')} | {r['k']} | "
              f"{r['rel_l2']:.4f} | {r['feature_distance']:.3f} | {r['class_logprob']:.4f} | {r['class_acc']:.1%} |"
              for r in rows]
    write_text(out / "ablations.md",
               f"# ReCache ablations ({args.mechanism}, 100 held-out pairs)\n\n" + "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, sweep in zip(axes, ("alpha", "entropy"), strict=True):
        for k in budgets:
            pts = [r for r in rows if r["sweep"] == sweep and r["k"] == k]
            uni = next(r for r in rows if r["sweep"] == "uniform" and r["k"] == k)
            ax.plot([r["rel_l2"] for r in pts], [r["class_logprob"] for r in pts], marker="o", label=f"k = {k}")
            for r in pts:
                ax.annotate(f"{r['value']:g}", (r["rel_l2"], r["class_logprob"]), fontsize=7)
            ax.scatter([uni["rel_l2"]], [uni["class_logprob"]], marker="x", color="k")
        ax.set_xscale("log")
        ax.set_xlabel("relative L2 to uncached (lower is better); x = uniform schedule")
        ax.set_ylabel("classifier log p(intended class)")
        ax.set_title(f"{sweep} sweep ({args.mechanism})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "ablations.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print((out / "ablations.md").read_text())


if __name__ == "__main__":
    main()

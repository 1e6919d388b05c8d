"""Results as files a person reads: summaries, paired comparisons and Markdown tables (rows are written as JSONL by
``recache.io.write_jsonl``)."""

from __future__ import annotations

from collections import defaultdict

import torch

from recache.evaluation.evaluate import METRICS, metrics_of
from recache.metrics import mean_and_se

LOWER_IS_BETTER = {"rel_l2": True, "psnr": False, "ssim": False, "feature_distance": True, "class_correct": False}


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (policy, mechanism, k): mean and standard error of each metric, realised passes, cost."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["mechanism"], r["k"])].append(r)
    out = []
    for (policy, mechanism, k), rs in groups.items():
        passes = [r["full_passes"] for r in rs]
        entry = {"policy": policy, "mechanism": mechanism, "k": k, "T": rs[0]["T"], "n": len(rs),
                 "realised_k": sum(passes) / len(rs), "realised_k_min": min(passes), "realised_k_max": max(passes),
                 "pass_equivalents": sum(r.get("pass_equivalents", r["full_passes"]) for r in rs) / len(rs),
                 "flops_reduction": rs[0]["flops_reduction"], "speedup": rs[0]["speedup"]}
        for m in metrics_of(rs):
            entry[m], entry[m + "_se"] = mean_and_se(torch.tensor([r[m] for r in rs]))
        out.append(entry)
    return sorted(out, key=lambda e: (e["k"], e["mechanism"], e["policy"]))


def markdown_table(summary: list[dict]) -> str:
    head = ("| policy | mechanism | k / T | realised k | pass eq. | FLOPs red. | speed-up | rel. L2 | PSNR (dB) | "
            "SSIM | feature dist. | class acc. |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for e in summary:
        cells = [("n/a" if m not in e else f"{e[m]:.4f} ± {e[m + '_se']:.4f}" if m != "psnr"
                  else f"{e[m]:.2f} ± {e[m + '_se']:.2f}") for m in METRICS[:-1]]
        cells.append(f"{e['class_correct']:.1%}" if "class_correct" in e else "n/a")
        spread = "" if e["realised_k_min"] == e["realised_k_max"] else f" ({e['realised_k_min']}-{e['realised_k_max']})"
        lines.append(f"| {e['policy']} | {e['mechanism']} | {e['k']} / {e['T']} | {e['realised_k']:.4g}{spread} | "
                     f"{e['pass_equivalents']:.4g} | {e['flops_reduction']:.2f}x | "
                     + (f"{e['speedup']:.2f}x | " if e["speedup"] else "n/a | ") + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def paired_comparison(rows: list[dict], baseline: str = "uniform",
                      metrics=("rel_l2", "feature_distance")) -> list[dict]:
    """Every other policy against ``baseline`` at the same mechanism and k, paired over the same (class, seed):
    mean difference (policy - baseline), its paired standard error, and a verdict at two standard errors."""
    metrics = [m for m in metrics if m in metrics_of(rows)]
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["policy"], r["mechanism"], r["k"])][(r["class"], r["seed"])] = r
    out = []
    for (policy, mechanism, k), samples in sorted(by_key.items(),
                                                  key=lambda item: (item[0][2], item[0][1], item[0][0])):
        base = by_key.get((baseline, mechanism, k))
        if policy == baseline or base is None or base.keys() != samples.keys():
            continue
        entry = {"policy": policy, "baseline": baseline, "mechanism": mechanism, "k": k, "n": len(samples)}
        for m in metrics:
            diff = torch.tensor([samples[p][m] - base[p][m] for p in samples], dtype=torch.float64)
            mean, se = mean_and_se(diff)
            better = -mean if LOWER_IS_BETTER[m] else mean
            entry[m] = {"diff": mean, "se": se, "baseline": sum(b[m] for b in base.values()) / len(base),
                        "verdict": "better" if better > 2 * se else "worse" if better < -2 * se else "tie"}
        out.append(entry)
    return out


def markdown_paired_table(comparison: list[dict], metrics=("rel_l2", "feature_distance")) -> str:
    metrics = [m for m in metrics if m in comparison[0]] if comparison else list(metrics)
    head = ("| policy | mechanism | k | "
            + " | ".join(f"{m}: baseline -> policy (paired diff ± SE)" for m in metrics) + " |\n")
    head += "|---" * (3 + len(metrics)) + "|\n"
    lines = []
    for e in comparison:
        cells = [f"{e[m]['baseline']:.4f} -> {e[m]['baseline'] + e[m]['diff']:.4f} "
                 f"({e[m]['diff']:+.4f} ± {e[m]['se']:.4f}, **{e[m]['verdict']}**)" for m in metrics]
        lines.append(f"| {e['policy']} | {e['mechanism']} | {e['k']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"

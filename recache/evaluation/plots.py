"""Plots of an evaluation: quality against budget, one line per (policy, mechanism), error bars = standard error."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recache.io import atomic_path  # noqa: E402

LABELS = {"rel_l2": "relative L2 to uncached (lower is better)", "feature_distance": "classifier feature distance (lower is better)",
          "psnr": "PSNR to uncached, dB (higher is better)", "ssim": "SSIM to uncached (higher is better)"}


def plot_quality_vs_budget(summary: list[dict], path: str | os.PathLike, metrics=("rel_l2", "feature_distance", "psnr", "ssim")) -> None:
    lines: dict[str, list[dict]] = defaultdict(list)
    for e in summary:
        lines[f"{e['policy']} / {e['mechanism']}"].append(e)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, entries in sorted(lines.items()):
            entries = sorted(entries, key=lambda e: e["k"])
            ax.errorbar([e["k"] for e in entries], [e[metric] for e in entries], yerr=[e[metric + "_se"] for e in entries],
                        marker="o", ms=3, capsize=2, label=label)
        ax.set_xlabel(f"budget k (full passes of T = {summary[0]['T']})")
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        if metric in ("rel_l2", "feature_distance"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

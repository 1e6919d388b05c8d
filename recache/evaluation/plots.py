"""Plots a person would rather look at than a table: quality against budget and against measured speed-up, which
steps each method computes, sample grids, and the training, search and alignment curves."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from recache.io import atomic_path  # noqa: E402
from recache.viz import image_grid  # noqa: E402

LABELS = {"rel_l2": "relative L2 to uncached (lower is better)",
          "feature_distance": "classifier feature distance (lower is better)",
          "psnr": "PSNR to uncached, dB (higher is better)", "ssim": "SSIM to uncached (higher is better)"}


def _save(fig, path: str | os.PathLike) -> None:
    """Lay out, write the PNG atomically, and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_quality_vs_budget(summary: list[dict], path: str | os.PathLike,
                           metrics=("rel_l2", "feature_distance", "psnr", "ssim")) -> None:
    """Colour = mechanism, line style = policy (solid for the first policy in sorted order, e.g. recache before
    uniform)."""
    metrics = [m for m in metrics if m in summary[0]]  # a pipeline's images have no digit metrics
    lines: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in summary:
        lines[(e["policy"], e["mechanism"])].append(e)
    mechanisms = sorted({m for _, m in lines})
    policies = sorted({p for p, _ in lines})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (policy, mechanism), entries in sorted(lines.items()):
            entries = sorted(entries, key=lambda e: e["k"])
            ax.errorbar([e["k"] for e in entries], [e[metric] for e in entries],
                        yerr=[e[metric + "_se"] for e in entries], marker="o", ms=3, capsize=2,
                        label=f"{policy} / {mechanism}", color=f"C{mechanisms.index(mechanism) % 10}",
                        linestyle=styles[policies.index(policy) % len(styles)])
        ax.set_xlabel(f"budget k (full passes of T = {summary[0]['T']})")
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        if metric in ("rel_l2", "feature_distance"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


REINFORCE_CURVES = (("reward", "reward R"), ("fidelity", "fidelity D (lower is better)"),
                    ("quality", "quality Q: log p(class)"), ("entropy", "policy entropy (nats)"))
EXPERT_CURVES = (("elite_vs_uniform", "elite MSE / uniform MSE, mean over budgets"),
                 ("improved", "elites improved in the round"), ("distil_loss", "distillation NLL per step"))


def plot_training_curve(log: list[dict], path: str | os.PathLike, window: int = 10,
                        curves: tuple[tuple[str, str], ...] = REINFORCE_CURVES, x: str = "update") -> None:
    """One panel per logged ``curves`` key against ``x`` (thin: raw, thick: running mean): REINFORCE's reward, its
    fidelity and quality parts and the entropy, or expert iteration's progress (``EXPERT_CURVES``, by round)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2))
    steps = [row[x] for row in log]
    for ax, (key, title) in zip(axes, curves, strict=True):
        values = [row[key] for row in log]
        ax.plot(steps, values, lw=0.6, alpha=0.4, color="C0")
        ax.plot(steps, _smooth(values, window), lw=1.8, color="C0")
        ax.set_xlabel(x)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_search_history(history: list[dict], path: str | os.PathLike, uniform_loss: float | None = None) -> None:
    """Loss of every evaluated schedule (dots, by phase) and the best so far (line), against evaluations."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, phase in enumerate(("init", "anneal", "climb")):
        rows = [r for r in history if r["phase"] == phase]
        ax.scatter([r["evaluation"] for r in rows], [r["loss"] for r in rows], s=6, alpha=0.5, color=f"C{i}",
                   label=phase)
    ax.plot([r["evaluation"] for r in history], [r["best_loss"] for r in history], color="k", lw=1.5,
            label="best so far")
    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="gray", ls="--", lw=1, label="uniform schedule")
    ax.set_yscale("log")
    ax.set_xlabel("objective evaluations")
    ax.set_ylabel("MSE to uncached, calibration pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_alignment(log: list[dict], base: list[float], computed: list[int], path: str | os.PathLike) -> None:
    """Calibration loss per update (or per shift tried, on a pipeline), and the learned sigma grid against the base
    one (computed steps marked)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = "update" if "update" in log[0] else "shift"
    left.plot([r[x] for r in log], [r["loss"] for r in log], marker="o", ms=2)
    left.set_yscale("log")
    left.set_xscale("log" if x == "shift" else "linear")
    left.set_xlabel(x)
    left.set_title("MSE to uncached, calibration pairs", fontsize=9)
    left.grid(alpha=0.3)
    best = min(log, key=lambda r: r["loss"])["sigmas"]
    steps = range(len(base))
    right.plot(steps, base, color="gray", ls="--", label="base grid")
    right.plot(steps, best, color="C1", label="aligned grid")
    right.scatter(computed, [best[i] for i in computed], color="C1", s=14, zorder=3, label="computed steps")
    right.set_xlabel("step i")
    right.set_title("sigma_i", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    _save(fig, path)


def _label(entry: dict) -> str:
    return f"{entry['policy']} / {entry['mechanism']}"


def plot_quality_vs_cost(summary: list[dict], path: str | os.PathLike, x: str = "realised_k",
                         metrics=("rel_l2", "feature_distance", "psnr", "ssim")) -> None:
    """One line per (policy, mechanism) across budgets, against the mean realised full passes (``x="realised_k"``)
    or the measured wall-clock speed-up (``x="speedup"``); error bars = standard error over the pairs."""
    metrics = [m for m in metrics if m in summary[0]]  # a pipeline's images have no digit metrics
    lines: dict[str, list[dict]] = defaultdict(list)
    for e in summary:
        if e.get(x) is not None:
            lines[_label(e)].append(e)
    policies, mechanisms = sorted({e["policy"] for e in summary}), sorted({e["mechanism"] for e in summary})
    markers = "osD^v<>Px*"
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, entries in sorted(lines.items()):
            entries = sorted(entries, key=lambda e: e[x])
            policy = entries[0]["policy"]
            ax.errorbar([e[x] for e in entries], [e[metric] for e in entries],
                        yerr=[e[metric + "_se"] for e in entries],
                        marker=markers[mechanisms.index(entries[0]["mechanism"]) % len(markers)], ms=4, capsize=2,
                        lw=1.2, label=label, color=f"C{policies.index(policy) % 10}")
        ax.set_xlabel("mean realised full passes k" if x == "realised_k"
                      else "measured speed-up over uncached (batch 16)")
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        if metric in ("rel_l2", "feature_distance"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    _save(fig, path)


def plot_schedule_heatmap(rows: list[dict], k: int, path: str | os.PathLike) -> None:
    """Which steps each method computes at budget ``k``: the fraction of samples computing each step (1 for a
    fixed schedule), one line per (policy, mechanism), with its mean realised k."""
    masks: dict[str, list[list[int]]] = defaultdict(list)
    for r in rows:
        if r["k"] == k:
            masks[_label(r)].append(r["mask"])
    labels = sorted(masks)
    fractions = [[sum(col) / len(m) for col in zip(*m, strict=True)] for m in (masks[label] for label in labels)]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.2))
    image = ax.imshow(fractions, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(labels)),
                  [f"{label}  (k = {sum(map(sum, masks[label])) / len(masks[label]):.1f})" for label in labels],
                  fontsize=7)
    ax.set_xlabel("sampler step i (0 = pure noise)")
    ax.set_title(f"computed steps at budget k = {k} (shade: fraction of samples computing the step)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    _save(fig, path)


def plot_sample_strips(strips: list[tuple[str, torch.Tensor]], path: str | os.PathLike) -> None:
    """One labelled row of digits per method (the first row uncached), the same (class, seed) in each column."""
    fig, axes = plt.subplots(len(strips), 1, figsize=(0.62 * len(strips[0][1]) + 2.4, 0.72 * len(strips)),
                             squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], strips, strict=True):
        ax.imshow(image_grid(images, nrow=len(images)).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    _save(fig, path)

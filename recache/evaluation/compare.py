"""A comparison at equal budget: methods (uniform, searched, learned, calibrated heuristics) x mechanisms x budgets
on the same held-out pairs, written as JSONL rows, a Markdown report and PNG plots. ``recache eval`` and
``recache demo`` both run it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recache.errors import RecacheError
from recache.evaluation.evaluate import Method, evaluate, make_reference
from recache.evaluation.plots import plot_quality_vs_budget, plot_quality_vs_cost, plot_sample_strips, plot_schedule_heatmap
from recache.evaluation.protocol import calibration_pairs
from recache.evaluation.report import markdown_paired_table, markdown_table, paired_comparison, summarize, write_jsonl
from recache.io import write_json
from recache.metrics import mean_and_se
from recache.models.pretrained import load_classifier
from recache.policies.heuristics import HEURISTICS, OnlineHeuristic
from recache.policies.heuristics.calibrate import Calibration, calibrate

CALIBRATION_PAIRS = 32


def heuristic_methods(names: Sequence[str], budgets: Sequence[int], pipe, mechanisms: Sequence[str], folder: Path,
                      pairs: int = CALIBRATION_PAIRS, progress: bool = True) -> tuple[list[Method], list[str]]:
    """Each heuristic calibrated to each budget on calibration pairs (a JSON file per pair in ``folder``, reused
    when it matches), as methods: online heuristics with their own fill, fixed-schedule ones with each mechanism.
    Also returns a note for every budget a heuristic cannot reach (it is then evaluated at the closest)."""
    classes, seeds = calibration_pairs(pairs)
    methods, notes = [], []
    for name in names:
        fitted = {}  # constants fitted once per heuristic (TeaCache's polynomial, MagCache's ratios)
        for k in budgets:
            path = folder / f"{name}-k{k}.json"
            calibration = Calibration.load(path, T=pipe.steps, model=pipe.model_id) if path.exists() else None
            if calibration is None or calibration.pairs != pairs or calibration.target_k != k:
                calibration = calibrate(name, k, pipe, classes, seeds, fitted, progress=progress)
                calibration.save(path)
            fitted = calibration.options
            if not calibration.reachable:
                notes.append(f"{name} cannot reach k = {k} on the calibration pairs; evaluated at the closest it reaches, "
                             f"mean k = {calibration.mean_k:.2f} (threshold {calibration.threshold:.4g})")
            heuristic = calibration.build()
            if isinstance(heuristic, OnlineHeuristic):
                methods.append(Method(name, heuristic.fill, k, heuristic=heuristic))
            else:
                methods += [Method(name, m, k, schedule=heuristic.schedule(pipe.steps)) for m in mechanisms]
    return methods, notes


def _key(policy: str, mechanism: str, k: int) -> tuple[str, str, int]:
    return policy, mechanism, k


def run_comparison(pipe, methods: list[Method], out: Path, classes: torch.Tensor, seeds: list[int], timing_runs: int = 3,
                   resume: bool = False, progress: bool = True) -> dict:
    """Evaluate every method; ``rows.jsonl`` is rewritten after each one, so ``resume`` skips the methods already
    in it. Writes ``rows.jsonl``, ``summary.json`` and the plots; returns rows, summary, paired comparisons and the
    uncached samples."""
    keys = [_key(m.policy, m.mechanism, m.k) for m in methods]
    if not methods:
        raise RecacheError("nothing to evaluate: the list of policies, budgets and mechanisms is empty")
    if len(set(keys)) != len(keys):
        raise RecacheError("two methods have the same policy, mechanism and budget; give them different labels")
    classifier = load_classifier()
    ref = make_reference(pipe, classifier, classes, seeds)
    rows: list[dict] = []
    if resume and (out / "rows.jsonl").exists():
        pairs = {(int(c), int(s)) for c, s in zip(classes, seeds, strict=True)}
        kept = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in kept if (r["class"], r["seed"]) in pairs and _key(r["policy"], r["mechanism"], r["k"]) in keys]
    done = {_key(r["policy"], r["mechanism"], r["k"]) for r in rows}
    for method, key in tqdm(list(zip(methods, keys, strict=True)), desc="methods", disable=not progress):
        if key not in done:
            rows += evaluate(pipe, classifier, ref, method, timing_runs)[0]
            write_jsonl(out / "rows.jsonl", rows)
    summary, paired = summarize(rows), paired_comparison(rows)
    write_json(out / "summary.json", {"summary": summary, "paired": paired, "uncached_seconds": ref.seconds})
    plot_quality_vs_budget(summary, out / "quality_vs_budget.png")
    plot_quality_vs_cost(summary, out / "quality_vs_realised_k.png", x="realised_k")
    if timing_runs:
        plot_quality_vs_cost(summary, out / "quality_vs_speedup.png", x="speedup")
    budgets = sorted({m.k for m in methods})
    for k in budgets:
        plot_schedule_heatmap(rows, k, out / f"schedules_k{k}.png")
        _sample_strips(pipe, [m for m in methods if m.k == k], ref, out / f"samples_k{k}.png")
    return {"rows": rows, "summary": summary, "paired": paired, "reference": ref.images, "reference_seconds": ref.seconds, "budgets": budgets}


def _sample_strips(pipe, methods: list[Method], ref, path: Path, pairs: int = 10) -> None:
    """Uncached vs each method on the first ``pairs`` evaluation pairs (one per class in the protocol's order)."""
    classes, seeds = ref.classes[:pairs], ref.seeds[:pairs]
    strips = [("uncached", ref.images[:pairs])]
    strips += [(f"{m.policy} / {m.mechanism}", m.sample(pipe, classes, seeds)[0]) for m in methods]
    plot_sample_strips(strips, path)


def headline(rows: list[dict], budgets: Sequence[int], metric: str = "feature_distance") -> tuple[list[dict], str]:
    """Per budget: the best uniform, best calibrated heuristic and best learned (ReCache) row by ``metric`` (any
    mechanism) among those whose mean realised k is within half a pass of the budget, and ReCache's relative change
    against the other two, with the paired standard error."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault(_key(r["policy"], r["mechanism"], r["k"]), {})[(r["class"], r["seed"])] = r
    groups = {"uniform": lambda p: p == "uniform", "best heuristic": lambda p: p in HEURISTICS, "ReCache": lambda p: p.startswith("recache")}
    entries, lines = [], []
    for k in budgets:
        best = {}
        for group, member in groups.items():
            candidates = [(key, samples) for key, samples in by_key.items() if key[2] == k and member(key[0])
                          and abs(sum(r["full_passes"] for r in samples.values()) / len(samples) - k) <= 0.5]  # at the budget only
            if candidates:
                best[group] = min(candidates, key=lambda c: sum(r[metric] for r in c[1].values()) / len(c[1]))
        if len(best) < 3:
            continue
        entry = {"k": k}
        for group, (key, samples) in best.items():
            first = next(iter(samples.values()))
            entry[group] = {"policy": key[0], "mechanism": key[1], metric: sum(r[metric] for r in samples.values()) / len(samples),
                            "realised_k": sum(r["full_passes"] for r in samples.values()) / len(samples), "speedup": first["speedup"]}
        learned = best["ReCache"][1]
        for other in ("best heuristic", "uniform"):
            base = best[other][1]
            diff = torch.tensor([learned[p][metric] - base[p][metric] for p in learned], dtype=torch.float64)
            mean, se = mean_and_se(diff)
            entry[f"vs {other}"] = {"relative": mean / entry[other][metric], "relative_se": se / entry[other][metric]}
        entries.append(entry)
        lines.append(f"| {k} | {_cell(entry['uniform'], metric)} | {_cell(entry['best heuristic'], metric)} | {_cell(entry['ReCache'], metric)} | "
                     + " | ".join(f"{100 * entry[f'vs {o}']['relative']:+.1f} % ± {100 * entry[f'vs {o}']['relative_se']:.1f}"
                                  for o in ("best heuristic", "uniform")) + " |")
    table = ("| k of T | uniform (best mechanism) | best calibrated heuristic | ReCache (best mechanism) | ReCache vs heuristic | "
             "ReCache vs uniform |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    return entries, table


def _cell(e: dict, metric: str) -> str:
    speed = f", {e['speedup']:.2f}x" if e["speedup"] else ""
    return f"{e[metric]:.3f} ({e['policy']} / {e['mechanism']}, k = {e['realised_k']:.3g}{speed})"


def markdown_report(result: dict, title: str, intro: str, notes: Sequence[str] = ()) -> str:
    """The comparison as Markdown: headline, notes, full table, paired comparisons and the plots."""
    entries, head = headline(result["rows"], result["budgets"])
    text = f"# {title}\n\n{intro}\n\n"
    if entries:  # only when uniform, a heuristic and ReCache were all evaluated
        text += f"## Headline: classifier feature distance to the uncached sample (lower is better)\n\n{head}\n"
        text += "Cells: mean feature distance (policy / mechanism, mean realised k, measured speed-up). Relative change of " \
                "ReCache against the other column, ± paired standard error over the same pairs.\n\n"
    if notes:
        text += "## Notes\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
    text += ("## All methods\n\nMean ± standard error over the pairs. realised k: mean full passes (min-max when samples "
             "differ); pass eq.: full passes plus probe blocks in units of a full pass; speed-up: median of same-run "
             "wall-clock ratios against uncached sampling of 16 images.\n\n" + markdown_table(result["summary"]))
    if result["paired"]:
        text += "\n## Paired against the uniform schedule (same mechanism and budget)\n\n" + markdown_paired_table(result["paired"])
    text += "\n## Plots\n\n![quality against realised budget](quality_vs_realised_k.png)\n\n"
    text += "![quality against measured speed-up](quality_vs_speedup.png)\n\n" if any(e["speedup"] for e in result["summary"]) else ""
    for k in result["budgets"]:
        text += f"![computed steps at k = {k}](schedules_k{k}.png)\n\n![samples at k = {k}: uncached first](samples_k{k}.png)\n\n"
    return text

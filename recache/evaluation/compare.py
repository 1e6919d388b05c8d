"""A comparison at equal budget: methods (uniform, searched, learned, calibrated heuristics) x mechanisms x budgets
on the same held-out pairs, written as JSONL rows, a Markdown report and PNG plots. ``recache eval`` and
``recache demo`` both run it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recache import distributed
from recache.errors import RecacheError
from recache.evaluation.evaluate import METRICS, Method, evaluate, make_reference, metrics_of
from recache.evaluation.plots import (
    plot_quality_vs_budget,
    plot_quality_vs_cost,
    plot_sample_strips,
    plot_schedule_heatmap,
)
from recache.evaluation.report import markdown_paired_table, markdown_table, paired_comparison, summarize
from recache.io import folder_lock, read_jsonl, write_json, write_jsonl
from recache.metrics import mean_and_se
from recache.models.pretrained import load_classifier
from recache.policies.heuristics import HEURISTICS, OnlineHeuristic
from recache.policies.heuristics.calibrate import Calibration, calibrate
from recache.protocol import CALIBRATION_PAIRS, calibration_pairs
from recache.sampling.interface import sampler_identity


def heuristic_methods(names: Sequence[str], budgets: Sequence[int], pipe, mechanisms: Sequence[str], folder: Path,
                      pairs: int = CALIBRATION_PAIRS, progress: bool = True) -> tuple[list[Method], list[str]]:
    """Each heuristic calibrated to each budget on calibration pairs (a JSON file per pair in ``folder``, reused
    only when it matches this run in full, else recalibrated and overwritten), as methods: online heuristics with
    their own fill, fixed-schedule ones with each mechanism. Also returns a note for every budget a heuristic
    cannot reach (it is then evaluated at the closest)."""
    classes, seeds = calibration_pairs(pairs)
    methods, notes = [], []
    for name in names:
        fitted = {}  # constants fitted once per heuristic (TeaCache's polynomial, MagCache's ratios)
        for k in budgets:
            path = folder / f"{name}-k{k}.json"
            calibration = _saved_calibration(path)
            if calibration is None or not calibration.matches(name, k, pipe, pairs):
                calibration = calibrate(name, k, pipe, classes, seeds, progress=progress and distributed.is_main(),
                                        fitted=fitted)
                if distributed.is_main():  # every rank calibrates alike (deterministic); rank 0 keeps the file
                    calibration.save(path)  # atomic: replaces a stale file whole
            fitted = calibration.options
            if not calibration.reachable:
                notes.append(f"{name} cannot reach k = {k} on the calibration pairs; evaluated at the closest "
                             f"it reaches, mean k = {calibration.mean_k:.2f} (threshold {calibration.threshold:.4g})")
            heuristic = calibration.build()
            if isinstance(heuristic, OnlineHeuristic):
                methods.append(Method(name, heuristic.fill, k, heuristic=heuristic))
            else:
                methods += [Method(name, m, k, schedule=heuristic.schedule(pipe.steps)) for m in mechanisms]
    return methods, notes


def _saved_calibration(path: Path) -> Calibration | None:
    """The calibration saved at ``path``, or None when there is none or it cannot be read (it is then redone)."""
    try:
        return Calibration.load(path) if path.exists() else None
    except RecacheError:
        return None


def _key(policy: str, mechanism: str, k: int) -> tuple[str, str, int]:
    return policy, mechanism, k


def run_comparison(pipe, methods: list[Method], out: Path, classes: torch.Tensor, seeds: list[int],
                   timing_runs: int = 3, resume: bool = False, progress: bool = True, clear: bool = False) -> dict:
    """Evaluate every method; ``rows.jsonl`` is rewritten after each one, so ``resume`` keeps the methods already
    in it whose rows cover exactly these (class, seed) pairs at this T, and evaluates the others again. Writes
    ``rows.jsonl``, ``summary.json`` and the plots; returns rows, summary, paired comparisons and the uncached samples.
    Under torchrun the ranks share the pairs (``evaluate``), every rank returns the whole result, rank 0 writes it.
    ``clear`` first removes what an earlier comparison wrote in ``out`` (``clear_results``); the folder is locked
    against a second run meanwhile."""
    keys = [_key(m.policy, m.mechanism, m.k) for m in methods]
    if not methods:
        raise RecacheError("nothing to evaluate: the list of policies, budgets and mechanisms is empty")
    if len(set(keys)) != len(keys):
        raise RecacheError("two methods have the same policy, mechanism and budget; give them different labels")
    if len(seeds) < distributed.world_size():
        raise RecacheError(f"{len(seeds)} pairs cannot be shared by {distributed.world_size()} ranks; "
                           "evaluate more pairs")
    with folder_lock(out, enabled=distributed.is_main()):
        if clear and distributed.is_main():
            clear_results(out)
        return _compare(pipe, methods, keys, out, classes, seeds, timing_runs, resume, progress)


def _compare(pipe, methods: list[Method], keys: list[tuple], out: Path, classes: torch.Tensor, seeds: list[int],
             timing_runs: int, resume: bool, progress: bool) -> dict:
    main, identity = distributed.is_main(), sampler_identity(pipe)
    rows: list[dict] = []
    if resume:
        rows = distributed.on_main(lambda: _previous_rows(out, keys, classes, seeds, identity))
    classifier = load_classifier() if getattr(pipe, "outputs_digits", True) else None  # digits: the embedded model
    ref = make_reference(pipe, classifier, classes, seeds)
    done = {_key(r["policy"], r["mechanism"], r["k"]) for r in rows}
    try:
        for method, key in tqdm(list(zip(methods, keys, strict=True)), desc="methods", disable=not (progress and main)):
            if key not in done:
                rows += [{**row, **identity} for row in evaluate(pipe, classifier, ref, method, timing_runs)]
                if main:
                    write_jsonl(out / "rows.jsonl", rows)
    except distributed.RankLost as e:
        raise distributed.RankLost(f"{e}; the rows of the methods done are kept in {out / 'rows.jsonl'}: "
                                   "resume with --resume") from None
    summary, paired = summarize(rows), paired_comparison(rows)
    budgets = sorted({m.k for m in methods})
    if main:
        write_json(out / "summary.json", {"sampler": identity, "summary": summary, "paired": paired,
                                          "uncached_seconds": ref.seconds})
        plot_quality_vs_budget(summary, out / "quality_vs_budget.png")
        plot_quality_vs_cost(summary, out / "quality_vs_realised_k.png", x="realised_k")
        if timing_runs:
            plot_quality_vs_cost(summary, out / "quality_vs_speedup.png", x="speedup")
        for k in budgets:
            plot_schedule_heatmap(rows, k, out / f"schedules_k{k}.png")
            _sample_strips(pipe, [m for m in methods if m.k == k], ref, out / f"samples_k{k}.png")
    return {"rows": rows, "summary": summary, "paired": paired, "reference": distributed.all_gather_rows(ref.images),
            "reference_seconds": ref.seconds, "budgets": budgets}


RESULT_FILES = ("rows.jsonl", "summary.json", "summary.md", "report.md")
RESULT_PLOTS = ("quality_*.png", "schedules_k*.png", "samples_k*.png", "samples.png")


def clear_results(out: Path) -> None:
    """Remove what an earlier comparison wrote in ``out`` (rows, summaries, plots of any budget); calibrations stay,
    they are reused only when they match."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in RESULT_PLOTS:
        for path in out.glob(pattern):
            path.unlink()


def _previous_rows(out: Path, keys: list[tuple], classes: torch.Tensor, seeds: list[int],
                   identity: dict) -> list[dict]:
    """The rows of ``out/rows.jsonl`` to keep on resume: those of the methods in ``keys`` with exactly one row per
    (class, seed) pair. A row measured on another model, T, sigma grid or guidance is refused, naming the setting;
    damaged lines and rows that record no sampler are skipped (their methods are evaluated again)."""
    pairs = sorted((int(c), int(s)) for c, s in zip(classes, seeds, strict=True))
    by_key: dict[tuple, list[dict]] = {}
    for r in read_jsonl(out / "rows.jsonl", "rows file"):
        for name, value in identity.items():
            if name in r and r[name] != value:
                raise RecacheError(f"{out} was evaluated with {name} {r[name]!r}, not {value!r}; resume with the "
                                   f"same {name}, or choose another --out")
        if (all(k in r for k in ("class", "seed", "full_passes", *identity, *METRICS[:3]))
                and isinstance(r.get("policy"), str) and isinstance(r.get("mechanism"), str)
                and isinstance(r.get("k"), int)
                and isinstance(r["class"], int) and isinstance(r["seed"], int)):
            by_key.setdefault(_key(r["policy"], r["mechanism"], r["k"]), []).append(r)
    return [r for key, group in by_key.items()
            if key in keys and sorted((r["class"], r["seed"]) for r in group) == pairs for r in group]


def _sample_strips(pipe, methods: list[Method], ref, path: Path) -> None:
    """Uncached vs each method on the first evaluation pairs (one per class in the protocol's order)."""
    classes, seeds = ref.first_classes, ref.first_seeds
    strips = [("uncached", pipe(classes, seeds))]
    strips += [(f"{m.policy} / {m.mechanism}", m.sample(pipe, classes, seeds)[0]) for m in methods]
    plot_sample_strips(strips, path)


HEADLINE_GROUPS = {  # column -> which policies it holds; the first, second and last must be evaluated for a row
    "uniform": lambda p: p == "uniform", "best heuristic": lambda p: p in HEURISTICS,
    "BudCache": lambda p: p == "budcache", "path plan": lambda p: p == "path",
    "ReCache": lambda p: p.startswith("recache")}
REQUIRED_GROUPS = ("uniform", "best heuristic", "ReCache")
_GROUP_NAMES = {"uniform": "uniform schedule", "best heuristic": "calibrated heuristic", "ReCache": "ReCache policy",
                "BudCache": "BudCache search", "path plan": "path plan"}


def headline(rows: list[dict], budgets: Sequence[int], metric: str = "feature_distance",
             costs: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """Per budget: the best row of each kind of schedule (uniform, calibrated heuristic, BudCache search, path plan,
    ReCache; any mechanism) by ``metric`` among those whose mean realised k is within half a pass of the budget; which
    kind is best, against the runner-up, and ReCache against the best heuristic and uniform, as relative changes
    with the paired standard error. ``costs`` (column -> text) adds a last row: what getting the schedules cost.
    Below the table, a line for every method left out for missing the budget, and for every budget left without a
    row because of it ("" when there is nothing to show)."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault(_key(r["policy"], r["mechanism"], r["k"]), {})[(r["class"], r["seed"])] = r
    entries, left_out = [], []
    for k in budgets:
        best = _best_of_each_kind(by_key, k, metric, left_out)
        if best is not None:
            entries.append(_headline_entry(k, best, metric))
    if not entries:
        return [], "\n".join(left_out) + "\n" if left_out else ""
    columns = list(HEADLINE_GROUPS)
    lines = [f"| {e['k']} | " + " | ".join(_cell(e[g], metric) if g in e else "-" for g in columns)
             + f" | {e['best']['group']}{_versus(e['best'])} | {_versus(e['vs best heuristic']).strip()} |"
             for e in entries]
    if costs:
        lines.append("| cost of the schedules | " + " | ".join(costs.get(g, "-") for g in columns) + " | | |")
    table = ("| k of T | uniform (best mechanism) | best calibrated heuristic | BudCache search | path plan | ReCache "
             "(best mechanism) | best, against the runner-up | ReCache vs heuristic |\n" + "|---" * 8 + "|\n"
             + "\n".join(lines) + "\n")
    return entries, table + ("\n" + "\n".join(left_out) + "\n" if left_out else "")


def _best_of_each_kind(by_key: dict, k: int, metric: str, left_out: list[str]) -> dict | None:
    """Column -> (key, samples) of its best method at budget ``k``; None when a required column has no method
    evaluated (nothing to say) or none within half a pass of the budget (said in ``left_out``)."""
    best = {}
    for group, member in HEADLINE_GROUPS.items():
        members = [(key, samples, sum(r["full_passes"] for r in samples.values()) / len(samples))
                   for key, samples in by_key.items() if key[2] == k and member(key[0])]
        if not members:
            if group in REQUIRED_GROUPS:
                return None  # a kind of method not evaluated at this budget: no headline row to speak of
            continue
        at_budget = [(key, samples) for key, samples, realised in members if abs(realised - k) <= 0.5]
        off = [f"{key[0]} / {key[1]} (realised k = {realised:.2f})" for key, _, realised in members
               if abs(realised - k) > 0.5]
        if not at_budget:
            left_out.append(f"- No row at k = {k}: no {_GROUP_NAMES[group]} within half a pass of the budget "
                            f"(left out: {', '.join(off)}).")
            if group in REQUIRED_GROUPS:
                return None
            continue
        best[group] = min(at_budget, key=lambda c: sum(r[metric] for r in c[1].values()) / len(c[1]))
        if off:
            left_out.append(f"- Left out at k = {k}: {', '.join(off)}: more than half a pass from the budget.")
    return best


def _headline_entry(k: int, best: dict, metric: str) -> dict:
    entry = {"k": k}
    for group, (key, samples) in best.items():
        first = next(iter(samples.values()))
        entry[group] = {"policy": key[0], "mechanism": key[1],
                        metric: sum(r[metric] for r in samples.values()) / len(samples),
                        "realised_k": sum(r["full_passes"] for r in samples.values()) / len(samples),
                        "speedup": first["speedup"]}
    ranked = sorted(best, key=lambda g: entry[g][metric])
    entry["best"] = {"group": ranked[0], **_relative(best[ranked[0]][1], best[ranked[1]][1], metric), "vs": ranked[1]}
    for other in ("best heuristic", "uniform"):
        entry[f"vs {other}"] = {**_relative(best["ReCache"][1], best[other][1], metric), "vs": other}
    return entry


def _relative(samples: dict, base: dict, metric: str) -> dict:
    """Mean paired change of ``samples`` against ``base``, relative to ``base``'s mean, with its standard error."""
    diff = torch.tensor([samples[p][metric] - base[p][metric] for p in samples], dtype=torch.float64)
    mean, se = mean_and_se(diff)
    base_mean = sum(r[metric] for r in base.values()) / len(base)
    return {"relative": mean / base_mean, "relative_se": se / base_mean}


def _versus(change: dict) -> str:
    significant = abs(change["relative"]) > 2 * change["relative_se"]
    text = f"{100 * change['relative']:+.1f} % ± {100 * change['relative_se']:.1f} vs {change['vs']}"
    return f" **{text}**" if significant else f" {text} (not significant)"


def _cell(e: dict, metric: str) -> str:
    speed = f", {e['speedup']:.2f}x" if e["speedup"] else ""
    return f"{e[metric]:.3f} ({e['policy']} / {e['mechanism']}, k = {e['realised_k']:.3g}{speed})"


def markdown_report(result: dict, title: str, intro: str, notes: Sequence[str] = (),
                    costs: dict[str, str] | None = None) -> str:
    """The comparison as Markdown: headline, notes, full table, paired comparisons and the plots."""
    entries, head = (headline(result["rows"], result["budgets"], costs=costs)
                     if "feature_distance" in metrics_of(result["rows"]) else ([], ""))
    text = f"# {title}\n\n{intro}\n\n"
    if head:  # only when uniform, a heuristic and ReCache were all evaluated at some budget
        text += f"## Headline: classifier feature distance to the uncached sample (lower is better)\n\n{head}\n"
    if entries:
        text += ("Cells: mean feature distance (policy / mechanism, mean realised k, measured speed-up). The best "
                 "kind of schedule at each budget against the runner-up, and ReCache against the best heuristic: "
                 "relative change ± paired standard error over the same pairs (bold: more than two).\n\n")
    if notes:
        text += "## Notes\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
    text += ("## All methods\n\nMean ± standard error over the pairs. realised k: mean full passes (min-max when "
             "samples differ); pass eq.: full passes plus probe blocks in units of a full pass; speed-up: median "
             "of same-run wall-clock ratios against uncached sampling of 16 images.\n\n"
             + markdown_table(result["summary"]))
    if result["paired"]:
        text += ("\n## Paired against the uniform schedule (same mechanism and budget)\n\n"
                 + markdown_paired_table(result["paired"]))
    text += "\n## Plots\n\n![quality against realised budget](quality_vs_realised_k.png)\n\n"
    text += ("![quality against measured speed-up](quality_vs_speedup.png)\n\n"
             if any(e["speedup"] for e in result["summary"]) else "")
    for k in result["budgets"]:
        text += (f"![computed steps at k = {k}](schedules_k{k}.png)\n\n"
                 f"![samples at k = {k}: uncached first](samples_k{k}.png)\n\n")
    return text

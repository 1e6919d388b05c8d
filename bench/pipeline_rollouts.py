"""Batched rollouts through the hooks on mnist-flux: one pipeline call for the P x G rollouts of a REINFORCE update
(each row by its own schedule, the hooks' row schedules) against one call per schedule, in the same run.

    .venv/bin/python bench/pipeline_rollouts.py [--pairs 2] [--group 8] [--repeats 3]
        [--out runs/bench/pipeline_rollouts]

The rollouts are those of an update: P calibration pairs, each with its own budget k (drawn from 4-20, as the
trainer draws them) and G schedules of k passes (step 0 and k - 1 random steps). Reports rollouts per second of both
ways (median of ``--repeats`` alternating timings), the largest difference between a batched row and its own call,
and per CFG branch the block-stack calls, the rows the masks compute and the rows the first block really ran on: a
batched call calls the blocks at every step where any row computes, on those rows alone and on one row of each kind
that is equal (rows of one pair are, until their schedules first differ); one call per schedule calls them k times
on its one row. Then where a
batched call's time goes: inside the blocks' own forward, what the same call costs when every row computes at
step 0 only (embeddings, output layers, scheduler, the estimates; minus its blocks), and the rest, the hooks' work
at the steps where only some rows compute (the cached rows' estimates, slicing, the record). Writes results.json
and pipeline_rollouts.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from recache.hooks.transformers import denoisers_of, transformer_blocks
from recache.io import write_json, write_text
from recache.protocol import calibration_pairs
from recache.sampling.diffusers_rollouts import load_rollouts


def update_masks(pairs: int, group: int, T: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The (pairs x group, T) masks of one update's rollouts and each pair's budget."""
    g = torch.Generator().manual_seed(seed)
    budgets = torch.randint(4, 21, (pairs,), generator=g).tolist()
    masks = torch.zeros(pairs * group, T, dtype=torch.bool)
    for row in range(pairs * group):
        k = budgets[row // group]
        masks[row, 0] = True
        masks[row, 1 + torch.randperm(T - 1, generator=g)[: k - 1]] = True
    return masks, budgets


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@contextmanager
def block_seconds(pipe):
    """A list whose first item adds up the seconds spent inside the blocks' own forward (the hooks wrap it) and whose
    second counts the batch rows the first block ran on."""
    total = [0.0, 0]
    blocks = [b for t in denoisers_of(pipe) for b in transformer_blocks(t)]

    def timing(forward, first):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            total[0] += time.perf_counter() - start
            if first:
                total[1] += (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]
            return out
        return run

    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance, to put back
    for i, block in enumerate(blocks):
        block.forward = timing(block.forward, i == 0)
    try:
        yield total
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def breakdown(ways: dict, repeats: int, pipe) -> tuple[dict[str, float], dict[str, int]]:
    """Medians, in seconds, of where the time of the ``ways`` (batched, one call per schedule, and the batched call
    with step 0 alone) goes: in all and inside the blocks; then the batched call's parts (the module's docstring).
    Also the batch rows the first block ran on in one run of each way."""
    runs, rows = {way: [] for way in ways}, {}
    with block_seconds(pipe) as inside:
        for _ in range(repeats):
            for way, run in ways.items():
                inside[0], inside[1] = 0.0, 0
                seconds, _ = timed(run)
                runs[way].append((seconds, inside[0]))
                rows[way] = inside[1]
    median = {way: [statistics.median(r[i] for r in rs) for i in range(2)] for way, rs in runs.items()}
    (total, blocks), (alone, alone_blocks), (floor, floor_blocks) = median.values()
    return {"batched: in all": total, "batched: inside the blocks": blocks,
            "batched: per call (step 0 alone, its blocks excluded)": floor - floor_blocks,
            "batched: the rows' bookkeeping at partial steps": total - blocks - (floor - floor_blocks),
            "one call per schedule: in all": alone, "one call per schedule: inside the blocks": alone_blocks}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/pipeline_rollouts")
    args = parser.parse_args()
    rollouts = load_rollouts("mnist-flux")
    classes, seeds = calibration_pairs(args.pairs)
    masks, budgets = update_masks(args.pairs, args.group, rollouts.steps)
    conds = [int(c) for c in classes.repeat_interleave(args.group)]
    row_seeds = [s for s in seeds for _ in range(args.group)]

    def batched():
        return rollouts.rollout_rows(conds, row_seeds, masks, "taylorseer")

    def one_per_schedule():
        outs = [rollouts.rollout_rows([c], [s], m[None], "taylorseer") for c, s, m in zip(conds, row_seeds, masks,
                                                                                         strict=True)]
        return torch.cat([o for o, _ in outs]), torch.cat([p for _, p in outs])

    times = {"batched": [], "one call per schedule": []}
    for _ in range(args.repeats):  # alternating, so drift of the machine hits both alike
        seconds, (together, passes) = timed(batched)
        times["batched"].append(seconds)
        seconds, (alone, alone_passes) = timed(one_per_schedule)
        times["one call per schedule"].append(seconds)
    step_zero = torch.zeros_like(masks)
    step_zero[:, 0] = True
    parts, block_rows = breakdown({"batched": batched, "one call per schedule": one_per_schedule,
                       "step 0 alone": lambda: rollouts.rollout_rows(conds, row_seeds, step_zero, "taylorseer")},
                      args.repeats, rollouts.pipe)
    n = len(conds)
    medians = {way: statistics.median(t) for way, t in times.items()}
    result = {
        "pairs": args.pairs, "group": args.group, "budgets": budgets, "T": rollouts.steps, "rollouts": n,
        "seconds": times, "median_seconds": medians,
        "rollouts_per_second": {way: n / s for way, s in medians.items()},
        "speedup": medians["one call per schedule"] / medians["batched"],
        "max_abs_difference": (together - alone).abs().max().item(),
        "passes_equal": torch.equal(passes, alone_passes) and passes.tolist() == masks.sum(1).tolist(),
        "block_stack_calls_per_branch": {"batched": int(masks.any(0).sum()), "one call per schedule": int(masks.sum())},
        "rows_computed_per_branch": int(masks.sum()), "batched_breakdown_seconds": parts,
        "first_block_rows_per_branch": {way: block_rows[way] // 2 for way in times}}  # two CFG branches
    write_report(Path(args.out), result, args.repeats)


def write_report(out: Path, result: dict, repeats: int) -> None:
    """results.json and pipeline_rollouts.md (printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    n = result["rollouts"]
    lines = [f"mnist-flux, T = {result['T']}, true CFG, {result['pairs']} pairs x {result['group']} schedules "
             f"(budgets {result['budgets']}), taylorseer; median of {repeats} alternating runs", "",
             "| way | seconds (median) | rollouts / s | block-stack calls per branch | rows the masks compute "
             "| rows the first block ran on |", "|---|---|---|---|---|---|"]
    for way, seconds in result["median_seconds"].items():
        lines.append(f"| {way} | {seconds:.2f} | {n / seconds:.2f} | {result['block_stack_calls_per_branch'][way]} "
                     f"| {result['rows_computed_per_branch']} | {result['first_block_rows_per_branch'][way]} |")
    parts = result["batched_breakdown_seconds"]
    lines += ["", f"speed-up in rollouts per second: {result['speedup']:.2f}x; largest difference between a batched "
              f"row and its own call: {result['max_abs_difference']:.2e}; realised passes equal the masks': "
              f"{result['passes_equal']}", "",
              f"where the time goes (median of {repeats}, timed apart from the runs above):", "",
              "| part | seconds |", "|---|---|"] + [f"| {part} | {seconds:.3f} |" for part, seconds in parts.items()]
    write_text(out / "pipeline_rollouts.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()

"""Data-parallel training throughput: REINFORCE rollouts per second with 1 and 2 processes (torchrun, gloo).

Each configuration runs ``recache train`` on the embedded DiT (T = 50, taylorseer) with the same global batch per
update (``--pairs`` x ``--group`` rollouts over all ranks): one process with all the threads, one process with one
thread, and ``--nproc 2`` (one thread each). Rollouts per second = rollouts per update / the median update time of
the run (its first two updates left out); the wall time includes start-up, the uncached targets and the guard.
Rows go to ``runs/bench/data_parallel.jsonl``, the table to ``.md`` and a plot to ``.png``.

    .venv/bin/python bench/data_parallel.py [--runs 3 --updates 12 --pairs 4 --group 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recache.io import (
    read_jsonl,  # noqa: E402
    write_jsonl,  # noqa: E402
    write_text,  # noqa: E402
)

CONFIGS = [("1 process, all threads", 1, None), ("1 process, 1 thread", 1, "1"), ("2 processes, 1 thread each", 2, "1")]


def run(nproc: int, threads: str | None, args, folder: Path) -> dict:
    env = ({k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
           | ({"OMP_NUM_THREADS": threads} if threads else {}))
    argv = [sys.executable, "-m", "recache", "train", "--trainer", "reinforce", "--updates", str(args.updates),
            "--pairs", str(args.pairs // nproc), "--group", str(args.group), "--k-min", "4", "--k-max", "25",
            "--pool", str(args.pool), "--out", str(folder), "--nproc", str(nproc)]
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    update = statistics.median(row["seconds"] for row in read_jsonl(folder / "train_log.jsonl")[2:])
    return {"update_seconds": update, "rollouts_per_second": args.pairs * args.group / update, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per update over all ranks (even)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--out", default="runs/bench/data_parallel")
    args = parser.parse_args()
    rows = []
    for run_index in range(args.runs):
        # interleaved, so a drift of the machine's speed touches every configuration
        for name, nproc, threads in CONFIGS:
            folder = Path(tempfile.mkdtemp(prefix="recache-dp-"))
            try:
                rows.append({"config": name, "nproc": nproc, "threads": threads or "all", "run": run_index,
                             "cores": os.cpu_count(), "updates": args.updates,
                             "rollouts_per_update": args.pairs * args.group, **run(nproc, threads, args, folder)})
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(json.dumps(rows[-1]))
    out = Path(args.out)
    write_jsonl(out.with_suffix(".jsonl"), rows)
    table = ("| configuration | rollouts/s (median) | runs | update s (median) | wall s (median) |\n"
             "|---|---|---|---|---|\n")
    medians = {}
    for name, _, _ in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        medians[name] = statistics.median(r["rollouts_per_second"] for r in mine)
        each = ", ".join(f"{r['rollouts_per_second']:.1f}" for r in mine)
        table += (f"| {name} | {medians[name]:.1f} | {each} | "
                  f"{statistics.median(r['update_seconds'] for r in mine):.3f} | "
                  f"{statistics.median(r['wall_seconds'] for r in mine):.1f} |\n")
    write_text(out.with_suffix(".md"), table)
    print(table)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(medians), list(medians.values()), color=["#888", "#bbb", "#1f77b4"])
    ax.set_xlabel(f"REINFORCE rollouts per second (T = 50, {args.pairs} x {args.group} per update)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

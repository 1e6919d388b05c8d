"""Runs killed at random moments and resumed: what is lost, and whether the end is the uninterrupted one.

``recache train`` on the embedded DiT (T = 20, taylorseer, 30 updates of 2 pairs x 4 schedules, seed 11) is run once
whole, then ``--kills`` times stopped at a random moment of its updates (SIGINT or SIGKILL in turn) and resumed with
``--resume`` until it ends. Per kill: the updates finished when the signal was sent, the updates in the checkpoint
afterwards (lost = the difference; work in progress is always lost), whether the checkpoint loaded, and whether the
resumed run's policy is bit-identical to the uninterrupted one. Also: ``recache search`` killed and resumed the same
way (memo entries kept, same schedule). Rows go to ``runs/bench/kill_resume.jsonl`` and a table to ``.md``.

    .venv/bin/python bench/kill_resume.py [--kills 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from recache.io import read_jsonl, write_jsonl, write_text
from recache.policies.training import CHECKPOINT, LOG

TRAIN = [sys.executable, "-m", "recache", "train", "--trainer", "reinforce", "--steps", "20",
         "--mechanism", "taylorseer", "--updates", "30", "--pairs", "2", "--group", "4", "--pool", "8",
         "--k-min", "4", "--k-max", "10", "--seed", "11"]
SEARCH = [sys.executable, "-m", "recache", "search", "--steps", "20", "--budget", "6", "--pairs", "4",
          "--sa-iters", "60", "--hc-iters", "3", "--seed", "5"]


def step_of(folder: Path) -> int | None:
    try:
        with safe_open(str(folder / CHECKPOINT), framework="pt") as f:
            return json.loads(f.metadata()["recache"])["step"]
    except Exception:  # noqa: BLE001 - a checkpoint that does not load is what this bench looks for
        return None


def kill_train(out: Path, sig: signal.Signals, rng: random.Random) -> dict:
    proc = subprocess.Popen([*TRAIN, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / CHECKPOINT).exists():  # start-up and targets: wait for the first update
        if proc.poll() is not None:
            raise RuntimeError(f"training stopped before its first update: {proc.stderr.read()[-500:]}")
        time.sleep(0.01)
    target = rng.randint(1, 27)
    while len(read_jsonl(out / LOG)) < target:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.15))  # anywhere inside an update (one takes about 0.1 s here)
    finished = len(read_jsonl(out / LOG))
    proc.send_signal(sig)
    _, err = proc.communicate()
    step = step_of(out)
    temporary = [p.name for p in out.iterdir() if p.name.startswith(".")]
    resumed = subprocess.run([*TRAIN, "--out", str(out), "--resume"], capture_output=True, text=True)
    return {"job": "train", "signal": sig.name, "finished_at_signal": finished, "checkpoint_updates": step,
            "lost_updates": None if step is None else finished - step, "temporary_files_left": temporary,
            "exit": proc.returncode, "message": err.strip().splitlines()[-1] if err.strip() else "",
            "resumed_exit": resumed.returncode}


def kill_search(out: Path, sig: signal.Signals, rng: random.Random) -> dict:
    proc = subprocess.Popen([*SEARCH, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "memo.jsonl").exists():
        if proc.poll() is not None:
            raise RuntimeError("search stopped before its first evaluation")
        time.sleep(0.01)
    time.sleep(rng.uniform(0.1, 1.0))
    lines = len((out / "memo.jsonl").read_text().splitlines())
    ended_before = proc.poll() is not None
    proc.send_signal(sig)
    proc.wait()
    kept = len([line for line in (out / "memo.jsonl").read_text().splitlines() if line.endswith("}")])
    resumed = subprocess.run([*SEARCH, "--out", str(out), "--resume"], capture_output=True, text=True)
    return {"job": "search", "signal": sig.name, "ended_before_signal": ended_before, "memo_lines_at_signal": lines,
            "memo_lines_kept": kept, "exit": proc.returncode,
            "resumed_exit": resumed.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/kill_resume")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="recache-kill-") as tmp:
        tmp = Path(tmp)
        subprocess.run([*TRAIN, "--out", str(tmp / "whole")], check=True, capture_output=True)
        subprocess.run([*SEARCH, "--out", str(tmp / "whole-search")], check=True, capture_output=True)
        whole = load_file(tmp / "whole/policy/model.safetensors")
        whole_schedule = json.loads((tmp / "whole-search/schedule.json").read_text())["mask"]
        rows = []
        for i in range(args.kills):
            sig = (signal.SIGINT, signal.SIGKILL)[i % 2]
            row = kill_train(tmp / f"train{i}", sig, rng)
            resumed = load_file(tmp / f"train{i}/policy/model.safetensors")
            row["bit_identical"] = all(bool((whole[k] == resumed[k]).all()) for k in whole)
            rows.append(row)
            print(json.dumps(row))
            row = kill_search(tmp / f"search{i}", sig, rng)
            row["same_schedule"] = json.loads((tmp / f"search{i}/schedule.json").read_text())["mask"] == whole_schedule
            rows.append(row)
            print(json.dumps(row))
    out = Path(args.out)
    write_jsonl(out.with_suffix(".jsonl"), rows)
    train = [r for r in rows if r["job"] == "train"]
    search = [r for r in rows if r["job"] == "search"]
    lost = [r["lost_updates"] for r in train if r["lost_updates"] is not None]
    table = ("| job | kills (SIGINT / SIGKILL) | checkpoint or memo loaded | lost | temporary files left | "
             "resumed to the end | same result as uninterrupted |\n|---|---|---|---|---|---|---|\n")
    table += (f"| train | {sum(r['signal'] == 'SIGINT' for r in train)} / "
              f"{sum(r['signal'] == 'SIGKILL' for r in train)} | "
              f"{sum(r['checkpoint_updates'] is not None for r in train)} of {len(train)} | "
              f"{max(lost) if lost else 'n/a'} updates at most (finished ones; the one in progress is redone) | "
              f"{sum(bool(r['temporary_files_left']) for r in train)} | "
              f"{sum(r['resumed_exit'] == 0 for r in train)} of {len(train)} | "
              f"{sum(r['bit_identical'] for r in train)} of {len(train)} bit-identical |\n")
    table += (f"| search | {sum(r['signal'] == 'SIGINT' for r in search)} / "
              f"{sum(r['signal'] == 'SIGKILL' for r in search)} | {len(search)} of {len(search)} | "
              f"{max(r['memo_lines_at_signal'] - r['memo_lines_kept'] for r in search)} memo entries at most | "
              f"- | {sum(r['resumed_exit'] == 0 for r in search)} of {len(search)} | "
              f"{sum(r['same_schedule'] for r in search)} of {len(search)} same schedule |\n")
    write_text(out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()

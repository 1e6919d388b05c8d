"""Data parallelism under torchrun: two gloo ranks (``--nproc 2``, real worker processes) train, search and evaluate
as one rank does with the same pairs; a rank killed mid-run stops the other with one line and a whole checkpoint.

Both sides run on one thread per process, so the only differences left are the ranks' smaller batches (rounding)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from recache import distributed
from recache.checkpoint import load_checkpoint
from recache.cli import main
from recache.io import read_jsonl
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.policies.training import CHECKPOINT

TRAIN = ["train", "--trainer", "reinforce", "--steps", "8", "--k-min", "2", "--k-max", "5", "--group", "3",
         "--pool", "4", "--seed", "7"]
EVAL = ["eval", "--steps", "8", "--budgets", "3", "--mechanisms", "reuse,taylorseer", "--per-class", "1",
        "--timing-runs", "0", "--heuristics", "teacache,magcache", "--calibration-pairs", "4"]
SEARCH = ["search", "--steps", "10", "--budget", "4", "--pairs", "4", "--sa-iters", "20", "--hc-iters", "2"]
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _two_ranks(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recache", *args, "--nproc", "2"], cwd=cwd, env=WORKER_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@given(st.integers(0, 200), st.integers(1, 9))
def test_blocks_split_the_items_in_order_with_sizes_within_one(n, w):
    blocks = [distributed.block(n, r, w) for r in range(w)]
    assert [i for b in blocks for i in range(n)[b]] == list(range(n))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_one_process_is_rank_zero_of_one_and_the_collectives_are_identities():
    assert ((distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.shard(5))
            == (0, 1, True, slice(0, 5)))
    x = torch.arange(3.0)
    assert distributed.all_reduce_sum(x) is x and distributed.all_gather_rows(x) is x
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_from_main(7) == 7


@pytest.mark.parametrize("argv", [["--nproc", "2", "-x"], ["--nproc=2", "-x"], ["--npr", "2", "-x"],
                                  ["-x", "--nproc", "2"]])
def test_the_workers_get_the_arguments_without_nproc(argv):
    assert distributed._without_nproc(argv) == ["-x"]


def test_only_train_search_and_eval_run_on_several_ranks(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--budget", "3", "--steps", "4"]) == 2
    assert "only train, search and eval run on several ranks" in capsys.readouterr().err


def test_two_ranks_of_one_pair_train_the_policy_one_rank_of_two_pairs_trains(tmp_path, one_thread):
    assert main([*TRAIN, "--updates", "3", "--pairs", "2", "--out", str(tmp_path / "one")]) == 0
    two = _two_ranks([*TRAIN, "--updates", "3", "--pairs", "1", "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one_w, two_w = (load_file(tmp_path / "one/policy/model.safetensors"),
                    load_file(tmp_path / "two/policy/model.safetensors"))
    assert one_w.keys() == two_w.keys()
    torch.manual_seed(7)  # the run's --seed: the initial weights
    start = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=5)).state_dict()
    for name in one_w:
        # Rounding differs between one batch of 2 pairs and 2 ranks of 1, and Adam amplifies it where gradients are
        # near zero: a few entries of a tensor differed by up to 2.4e-4 (measured), against weights that moved by
        # 5e-3 to 9e-3, so the whole tensor is compared: its gap measured 1e-4 to 1e-3 of how far it moved. A rank
        # that missed the other's gradient would move every entry by about the step size itself (lr = 3e-3).
        gap, moved = (one_w[name] - two_w[name]).norm(), (one_w[name] - start[name]).norm()
        assert gap <= 1e-2 * moved, (name, gap, moved)
    one_log, two_log = read_jsonl(tmp_path / "one/train_log.jsonl"), read_jsonl(tmp_path / "two/train_log.jsonl")
    assert [r["k"] for r in one_log] == [r["k"] for r in two_log]  # the same 2 budgets per update, one on each rank
    assert [r["reward"] for r in one_log] == pytest.approx([r["reward"] for r in two_log], rel=1e-5)
    configs = [json.loads((tmp_path / f"{run}/policy/config.json").read_text()) for run in ("one", "two")]
    assert (configs[0]["training"]["ranks"], configs[1]["training"]["ranks"]) == (1, 2)
    assert configs[0]["fallback"] == configs[1]["fallback"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_two_ranks_evaluate_the_table_one_rank_evaluates(tmp_path, one_thread, capsys):
    assert main([*EVAL, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two = _two_ranks([*EVAL, "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one_rows = [json.loads(line) for line in (tmp_path / "one/rows.jsonl").read_text().splitlines()]
    two_rows = [json.loads(line) for line in (tmp_path / "two/rows.jsonl").read_text().splitlines()]
    # uniform and magcache with 2 mechanisms, teacache with its own fill
    assert len(one_rows) == len(two_rows) == 5 * 10
    for a, b in zip(one_rows, two_rows, strict=True):  # the same rows in the same order; metrics up to rounding
        assert ({k: v for k, v in a.items() if not isinstance(v, float)}
                == {k: v for k, v in b.items() if not isinstance(v, float)})
        assert ([v for v in a.values() if isinstance(v, float)]
                == pytest.approx([v for v in b.values() if isinstance(v, float)], rel=1e-4, abs=1e-5))
    one_sum, two_sum = (json.loads((tmp_path / f"{run}/summary.json").read_text())["summary"] for run in ("one", "two"))
    assert [(e["policy"], e["mechanism"], e["k"], e["n"], e["realised_k"]) for e in one_sum] == \
           [(e["policy"], e["mechanism"], e["k"], e["n"], e["realised_k"]) for e in two_sum]
    assert [e["feature_distance"] for e in one_sum] == pytest.approx([e["feature_distance"] for e in two_sum], rel=1e-5)
    assert "| teacache | reuse | 3 / 8 |" in two.stdout and (tmp_path / "two/summary.md").exists()


def test_two_ranks_search_the_schedule_one_rank_searches(tmp_path, one_thread, capsys):
    assert main([*SEARCH, "--out", str(tmp_path / "one")]) == 0
    two = _two_ranks([*SEARCH, "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one_h, two_h = (read_jsonl(tmp_path / f"{run}/history.jsonl") for run in ("one", "two"))
    assert [h["steps"] for h in one_h] == [h["steps"] for h in two_h]
    # each rank rolls out 2 of the 4 pairs: other batches, other rounding (up to 7e-6 relative, measured on this CPU)
    assert [h["loss"] for h in one_h] == pytest.approx([h["loss"] for h in two_h], rel=1e-4)
    # "k = 4 of 10 (taylorseer): computed steps [...]"
    assert two.stdout.splitlines()[0] == capsys.readouterr().out.splitlines()[0]


def test_a_user_error_on_two_ranks_is_one_line_per_rank_without_traceback(tmp_path):
    result = _two_ranks([*TRAIN, "--k-max", "9", "--updates", "1", "--out", "bad"], tmp_path)
    assert result.returncode == 2
    assert "budget k=9 is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of the worker process of ``launcher`` with this global rank."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_training(tmp_path: Path, updates: int = 60) -> tuple[subprocess.Popen, list[str]]:
    """A 2-rank training run, once it has written a checkpoint of at least two updates."""
    argv = [sys.executable, "-m", "recache", *TRAIN, "--updates", str(updates), "--pairs", "1", "--out", "run",
            "--nproc", "2"]
    launcher = subprocess.Popen(argv, cwd=tmp_path, env=WORKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 120
    while not ((tmp_path / "run" / CHECKPOINT).exists() and len(read_jsonl(tmp_path / "run/train_log.jsonl")) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, "the training did not start"
        time.sleep(0.05)
    return launcher, argv


def test_a_stop_that_lands_in_a_finalizer_is_quiet_and_raised_by_the_next_collective(monkeypatch, capsys):
    """The launcher's SIGTERM can arrive while tqdm closes a bar in a finalizer, where Python cannot raise: it used to
    print a traceback there (a CI run caught it). Now it is quiet, and the rank stops at its next collective."""
    monkeypatch.setattr(distributed, "_stopped", [])
    monkeypatch.setattr(sys, "unraisablehook", distributed._quiet_when_stopped)

    class ClosesWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the finalizer

    previous = signal.signal(signal.SIGTERM, distributed._stopped_by_launcher)
    try:
        ClosesWhenCollected()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == ""
    with pytest.raises(distributed.RankLost, match="rank 0 was stopped by the launcher"):
        distributed._collective("barrier", lambda: None)

    class FailsWhenCollected:
        def __del__(self):
            raise ValueError("another error")

    FailsWhenCollected()
    assert "ValueError: another error" in capsys.readouterr().err  # other errors are still printed


def test_the_ranks_stop_when_the_launcher_is_killed(tmp_path):
    launcher, _ = _start_training(tmp_path, updates=100_000)  # far more than it can run in the minute it is given
    workers = [_worker(launcher.pid, rank) for rank in (0, 1)]
    assert None not in workers
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a rank ran on after its launcher was killed"
    from recache.policies.recache import ReCacheConfig, ReCachePolicy

    policy = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=5))
    step, _ = load_checkpoint(tmp_path / "run" / CHECKPOINT, {"policy": policy},
                              torch.optim.Adam(policy.parameters()), {"train": torch.Generator()})
    assert step >= 2


def test_a_rank_killed_mid_run_stops_the_other_with_one_line_and_the_checkpoint_intact(tmp_path):
    launcher, argv = _start_training(tmp_path)
    checkpoint = tmp_path / "run" / CHECKPOINT
    os.kill(_worker(launcher.pid, 1), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert "rank 1 was killed by SIGKILL" in err and "Traceback" not in err
    survivor = [line for line in err.splitlines() if line.startswith("recache train [rank 0]")]
    assert len(survivor) == 1 and "is intact: resume with --resume" in survivor[0], err[-2000:]
    from recache.policies.recache import ReCacheConfig, ReCachePolicy

    policy = ReCachePolicy(ReCacheConfig(T=8, k_min=2, k_max=5))
    step, extra = load_checkpoint(checkpoint, {"policy": policy}, torch.optim.Adam(policy.parameters()),
                                  {"train": torch.Generator()})
    assert extra["ranks"] == 2 and step == len(read_jsonl(tmp_path / "run/train_log.jsonl")) >= 2
    assert f"{step} updates" in survivor[0]
    refused = subprocess.run(argv[:-2] + ["--resume"], cwd=tmp_path, env=WORKER_ENV, capture_output=True, text=True,
                             timeout=120)
    assert (refused.returncode == 2 and "was trained on 2 ranks" in refused.stderr
            and "resume it with --nproc 2" in refused.stderr)
    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=WORKER_ENV, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [row["update"] for row in read_jsonl(tmp_path / "run/train_log.jsonl")] == list(range(60))
    assert (tmp_path / "run/policy/model.safetensors").exists()

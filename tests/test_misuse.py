"""Misuse that used to succeed: two runs on one folder, a symlinked or protected output, a full disk, a name too
long, an output folder deleted mid-run. Each is now refused or reported on one line, and nothing is lost. (The
cases a command line can express are rows of the table in docs/reliability.md.)"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from recache.cli import main
from recache.errors import RecacheError
from recache.io import folder_lock, write_text
from recache.policies import budcache
from recache.policies.budcache import SearchConfig, search_schedule
from recache.sampling.pipeline import DigitPipeline

SAMPLE = [sys.executable, "-m", "recache", "sample", "--steps", "4", "--per-class", "1"]


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with folder_lock(out):
        assert main(["train", "--trainer", "reinforce", "--steps", "8", "--k-min", "2", "--k-max", "4",
                     "--updates", "1", "--pool", "4", "--out", str(out)]) == 2
        assert "another recache run is writing to" in capsys.readouterr().err
        assert main(["search", "--steps", "8", "--budget", "3", "--sa-iters", "2", "--hc-iters", "0", "--pairs", "2",
                     "--out", str(out)]) == 2
        assert "another recache run is writing to" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # the refused runs wrote nothing; the lock itself leaves no file
    with folder_lock(out):  # released when the first holder is done
        pass


def test_a_symlinked_output_writes_its_target_and_keeps_the_link_and_a_file_keeps_its_mode(tmp_path):
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old")
    target.chmod(0o600)
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o600


def test_a_full_disk_is_one_line_and_the_previous_file_is_intact(tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    result = subprocess.run([*SAMPLE, "--out", str(out)], capture_output=True, text=True, preexec_fn=small_files,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot write {out} (File too large); the previous file is intact" in result.stderr
    assert out.read_bytes() == b"the previous grid" and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_a_file_name_too_long_is_refused_before_any_work(tmp_path, capsys):
    assert main(["sample", "--steps", "4", "--out", str(tmp_path / ("x" * 300 + ".png"))]) == 2
    assert "bytes; this file system allows at most" in capsys.readouterr().err


def test_a_search_whose_folder_is_deleted_mid_run_stops_with_one_line(tmp_path, monkeypatch):
    out = tmp_path / "search"
    real = budcache.rollout_objective

    def objective_that_loses_the_folder(*args, **kwargs):
        evaluate = real(*args, **kwargs)

        def once_then_delete(candidates):
            if (out / budcache.MEMO).exists():
                for path in out.iterdir():
                    path.unlink()
                out.rmdir()
            return evaluate(candidates)

        return once_then_delete

    monkeypatch.setattr(budcache, "rollout_objective", objective_that_loses_the_folder)
    pipe = DigitPipeline.from_pretrained(steps=8)
    with pytest.raises(RecacheError, match="cannot add to .*memo.jsonl .*the search stopped"):
        search_schedule(SearchConfig(k=3, pairs=2, sa_iters=4, hc_iters=0), pipe, out, progress=False)


def test_output_target_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RecacheError, match="exists and is not a regular file"):
        write_text(tmp_path / "fifo", "x")
    assert Path(tmp_path / "fifo").exists()


def test_budgets_take_the_same_forms_in_the_api_and_the_cli_and_round_up(tmp_path, capsys):
    import numpy as np
    import torch

    from recache.schedule import resolve_budget

    for budget in (3, np.int64(3), torch.tensor(3), 3.0):
        assert resolve_budget(budget, 50) == 3, budget
    assert resolve_budget("4x", 10) == 3  # 10 / 4 = 2.5 passes: 3, a 3.3x speed-up, never more than asked
    assert resolve_budget(0.2, 50) == 10 and resolve_budget("5x", 50) == 10 and resolve_budget(0.25, 10) == 3
    with pytest.raises(RecacheError, match="fraction 1.5 is not allowed"):
        resolve_budget(1.5, 50)
    for typed in ("4", "0.2", "5x"):
        assert main(["sample", "--steps", "20", "--per-class", "1", "--budget", typed,
                     "--out", str(tmp_path / "grid.png")]) == 0
        assert "realised full passes per sample: 4 (taylorseer, uniform schedule" in capsys.readouterr().out


def test_a_diffusers_cache_is_refused_on_top_of_recache_and_recache_on_top_of_it():
    import torch
    from diffusers import FirstBlockCacheConfig
    from tiny_diffusers import euler_loop, tiny_flux_transformer, transformer_inputs

    from recache.hooks import RecacheHookConfig, apply_recache, remove_recache

    transformer = tiny_flux_transformer()
    inputs, T = transformer_inputs(transformer), 6
    reference = euler_loop(transformer, T, inputs)
    apply_recache(transformer, RecacheHookConfig(budget=3, num_inference_steps=T))
    with pytest.raises(ValueError, match="Caching has already been enabled"):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    remove_recache(transformer)
    assert not transformer.is_cache_enabled and torch.equal(euler_loop(transformer, T, inputs), reference)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RecacheError, match="a diffusers cache is enabled on this transformer"):
        apply_recache(transformer, RecacheHookConfig(budget=3, num_inference_steps=T))
    transformer.disable_cache()
    assert torch.equal(euler_loop(transformer, T, inputs), reference)


def test_a_call_cut_short_leaves_nothing_that_changes_the_next_call():
    import torch
    from tiny_diffusers import tiny_flux_pipeline

    import recache

    pipe = tiny_flux_pipeline()
    call = {"prompt": "a photo of a cat", "height": 64, "width": 64, "max_sequence_length": 16, "output_type": "pt",
            "num_inference_steps": 8}

    def images(**extra):
        return pipe(**call, generator=torch.Generator().manual_seed(0), **extra).images

    recache.enable(pipe, budget=3)
    clean = images()
    expected = recache.summary(pipe).last["cond"]["computed_steps"]

    def stop_at_step_4(pipeline, step, timestep, kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        images(callback_on_step_end=stop_at_step_4)
    again = images()
    assert recache.summary(pipe).last["cond"]["computed_steps"] == expected == [0, 4, 7]
    assert torch.equal(again, clean)
    recache.disable(pipe)


def test_a_killed_runs_temporary_files_are_removed_when_the_next_run_takes_the_folder(tmp_path):
    from recache.io import remove_stale_temporaries

    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.safetensors.k3j9x2.tmp").write_bytes(b"half a checkpoint")
    (out / ".tmpRfR4iL").write_bytes(b"half a checkpoint, as safetensors writes it")  # a CI run left one of these
    (out / "checkpoint.safetensors").write_bytes(b"whole")
    (out / ".tmpnotes").write_bytes(b"not ours")
    assert [p.name for p in remove_stale_temporaries(out)] == [".checkpoint.safetensors.k3j9x2.tmp", ".tmpRfR4iL"]
    assert sorted(p.name for p in out.iterdir()) == [".tmpnotes", "checkpoint.safetensors"]

import json
import shutil
import subprocess
import sys

import pytest

from recache.cli import main
from recache.models.pretrained import WEIGHTS_DIR
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

_EMBEDDED = DigitPipeline.from_pretrained("mnist-dit")
T, BLOCKS = _EMBEDDED.steps, len(_EMBEDDED.model.blocks)  # the embedded model's defaults, which the commands use


def _fails(capsys, argv, pattern):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _check_one_line(capsys, pattern)


def _check_one_line(capsys, pattern):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err


@pytest.mark.parametrize("argv, pattern", [
    (["sample", "--steps", "-5"], r"--steps: -5 is not a whole number >= 1"),
    (["sample", "--steps", "ten"], r"--steps: 'ten' is not a whole number"),
    (["sample", "--classes", "3,12"], r"class 12 is outside 0-9"),
    (["sample", "--classes", "x"], r"class 'x' is not a digit"),
    (["sample", "--guidance", "nan"], r"--guidance: nan is not a finite number"),
    (["sample", "--per-class", "0"], r"--per-class: 0 is not a whole number"),
    (["sample", "--budget", "0"], r"--budget: budget k=0 is not allowed: use a whole number of full passes >= 1"),
    (["eval", "--timing-runs", "-1"], r"--timing-runs: -1 is not a whole number >= 0"),
    (["pretrain", "dit", "--architecture", "DiT-XXL"], r"invalid choice: 'DiT-XXL'"),
])
def test_bad_arguments(capsys, argv, pattern):
    _fails(capsys, argv, pattern)


def test_unknown_model(capsys, tmp_path):
    assert main(["sample", "--model", "sd-xl", "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"unknown model 'sd-xl'.*mnist-dit")
    assert not (tmp_path / "x.png").exists()


def test_unknown_sigmas(capsys, tmp_path):
    assert main(["sample", "--sigmas", "cosine", "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"unknown sigma schedule 'cosine'")


def test_corrupt_weights(capsys, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(WEIGHTS_DIR / "mnist-dit", folder)
    (folder / "model.safetensors").write_bytes(b"not a model")
    assert main(["sample", "--model", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"weights file .* is corrupt")
    assert not (tmp_path / "x.png").exists()


def test_sample_writes_png(capsys, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--classes", "1,7", "--per-class", "2", "--steps", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 samples x 4 steps, realised full passes per sample: 4 (uncached)" in capsys.readouterr().out


def test_console_script_exit_code(tmp_path):
    """The installed entry point: a user mistake is one stderr line and exit status 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "recache", "sample", "--classes", "10"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["recache sample: error: argument --classes: class 10 is outside 0-9"]


@pytest.mark.parametrize("argv, pattern", [
    (["sample", "--budget", str(T + 1)],
     rf"budget k={T + 1} is not allowed: use a whole number of full passes from 1 to T={T}"),
    (["sample", "--budget", "5", "--steps", "4"], r"budget k=5 is not allowed.*T=4"),
    (["eval", "--budgets", "5,80", "--mechanisms", "reuse"], r"budget k=80 is not allowed"),
])
def test_bad_budgets(capsys, tmp_path, argv, pattern):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    _check_one_line(capsys, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, pattern", [
    (["sample", "--mechanism", "fora"], r"--mechanism: invalid choice: 'fora'"),
    (["eval", "--mechanisms", "reuse,fora"], r"unknown mechanism 'fora'"),
    (["eval", "--budgets", "5,x"], r"'5,x' is not a comma-separated list"),
])
def test_bad_mechanisms_and_lists(capsys, argv, pattern):
    _fails(capsys, argv, pattern)


def test_schedule_file_errors(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"mask": [0, 1, 1]}')
    assert main(["sample", "--schedule", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"schedule file .*bad.json: step 0 must be computed")
    other = tmp_path / "other.json"
    Schedule.uniform(20, 5).save(other)
    assert main(["eval", "--schedule", str(other), "--budgets", "5", "--out", str(tmp_path / "ev")]) == 2
    _check_one_line(capsys, rf"is for T=20 steps, but this run has T={T}")
    assert main(["sample", "--schedule", str(other), "--budget", "3", "--steps", "20",
                 "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"either --schedule or --budget")
    assert not (tmp_path / "x.png").exists()


def test_sample_with_budget_reports_realised_passes(capsys, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--budget", "4", "--steps", "12", "--mechanism", "taylorseer", "--classes", "2",
                 "--per-class", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "realised full passes per sample: 4 (taylorseer, uniform schedule, computed steps [0, 4, 7, 11])" in text
    assert out.is_file()


def test_sample_says_where_a_policy_interpolated_or_kept_uniform(capsys, tmp_path):
    """T = 40 on a shift-2 grid lies between the shipped policy's trained settings: k = 5 is interpolated, k = 16
    kept uniform (the settings around it did not clearly beat uniform there), and the line says which."""
    for k, said in ((5, "interpolated between the policy's trained settings"), (16, "uniform kept by the policy's "
                                                                                  "guard, computed steps [0, 3, 5,")):
        assert main(["sample", "--policy", "mnist-dit-taylorseer", "--budget", str(k), "--steps", "40", "--sigmas",
                     "shifted:2", "--classes", "3", "--out", str(tmp_path / "x.png")]) == 0
        assert f"realised full passes per sample: {k} (taylorseer, recache schedule, {said}" in capsys.readouterr().out


def test_eval_writes_rows_table_and_plot(capsys, tmp_path):
    schedule = tmp_path / "mine.json"
    Schedule.from_steps(10, [0, 1, 5]).save(schedule)
    out = tmp_path / "ev"
    assert main(["eval", "--steps", "10", "--budgets", "3", "--mechanisms", "reuse,step-skip",
                 "--schedule", str(schedule), "--per-class", "1", "--timing-runs", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 10
    assert {r["policy"] for r in rows} == {"uniform", "file:mine"}
    assert all(r["full_passes"] == 3 and r["k"] == 3 for r in rows)
    assert min(r["seed"] for r in rows) >= 900_000
    table = (out / "summary.md").read_text()
    assert "| uniform | reuse | 3 / 10 | 3 |" in table and "| file:mine | step-skip | 3 / 10 | 3 |" in table
    assert (out / "quality_vs_budget.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("heuristics, pattern", [
    ("fastcache", r"--heuristics: unknown heuristic 'fastcache'; choose from fixed-interval, teacache"),
    ("", r"--heuristics: no heuristic named"),
    (",", r"--heuristics: no heuristic named"),
])
def test_bad_heuristic_lists(capsys, heuristics, pattern):
    _fails(capsys, ["eval", "--heuristics", heuristics], pattern)


def test_eval_with_heuristics_notes_unreachable_budgets_and_resumes(capsys, tmp_path):
    out = tmp_path / "ev"
    argv = ["eval", "--budgets", "14", "--mechanisms", "reuse", "--heuristics", "fixed-interval,first-block-cache",
            "--calibration-pairs", "2", "--per-class", "1", "--timing-runs", "0", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert ("note: fixed-interval cannot reach k = 14 on the calibration pairs; evaluated at the closest it reaches, "
            "mean k = 13.00" in text)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["mechanism"]) for r in rows} == {("uniform", "reuse"), ("fixed-interval", "reuse"),
                                                             ("first-block-cache", "first-block + reuse")}
    fbc = [r for r in rows if r["policy"] == "first-block-cache"]
    assert all(r["pass_equivalents"] == pytest.approx(r["full_passes"] + (T - r["full_passes"]) / BLOCKS) for r in fbc)
    assert all(sum(r["mask"]) == r["full_passes"] for r in rows)
    for png in ("schedules_k14.png", "samples_k14.png", "quality_vs_realised_k.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "calibrations").iterdir()) == ["first-block-cache-k14.json",
                                                                        "fixed-interval-k14.json"]
    # --resume keeps what is already in rows.jsonl (marked here) and evaluates nothing again
    marked = [{**r, "psnr": -1.0} for r in rows]
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    assert main([*argv, "--resume"]) == 0
    assert [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()] == marked


def test_calibrate_command(capsys, tmp_path):
    out = tmp_path / "mag.json"
    assert main(["calibrate", "--heuristic", "magcache", "--budget", "5", "--pairs", "2", "--out", str(out)]) == 0
    assert "(k = 5 is out of its reach: this is the closest)" in capsys.readouterr().out
    assert json.loads(out.read_text())["heuristic"] == "magcache"
    _fails(capsys, ["calibrate", "--heuristic", "fastcache", "--budget", "5"], r"invalid choice: 'fastcache'")
    assert main(["calibrate", "--heuristic", "teacache", "--budget", str(T + 1),
                 "--out", str(tmp_path / "t.json")]) == 2
    _check_one_line(capsys, rf"budget k={T + 1} is not allowed")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("out, pattern", [
    ("file/sub/c.json", r"calibrate: error: folder .*file/sub of output file c.json is not writable"),
    ("folder", r"calibrate: error: output file .*folder is a folder; give a file name"),
])
def test_calibrate_output_not_writable(capsys, tmp_path, monkeypatch, out, pattern):
    """Checked before calibrating: one line, exit status 2, nothing written."""
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr("recache.cli.calibrate.calibrate",
                        lambda *a, **k: pytest.fail("calibrated before checking the output"))
    assert main(["calibrate", "--heuristic", "teacache", "--budget", "10", "--out", str(tmp_path / out)]) == 2
    _check_one_line(capsys, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and not any((tmp_path / "folder").iterdir())


def test_resume_evaluates_again_when_the_pairs_change_and_refuses_another_sampler(capsys, tmp_path):
    """--resume keeps a method's rows only when they are exactly this run's (class, seed) pairs; rows measured on
    another T, guidance or sigma grid are refused with the setting named, and nothing is replaced."""
    out = tmp_path / "ev"
    argv = ["eval", "--budgets", "3", "--mechanisms", "reuse", "--timing-runs", "0", "--out", str(out), "--resume"]

    def rows():
        return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]

    def mark():
        (out / "rows.jsonl").write_text("".join(json.dumps({**r, "psnr": -1.0}) + "\n" for r in rows()))

    assert main([*argv, "--steps", "10", "--per-class", "1"]) == 0
    mark()
    assert main([*argv, "--steps", "10", "--per-class", "1"]) == 0
    assert all(r["psnr"] == -1.0 for r in rows())  # same pairs and T: kept
    assert main([*argv, "--steps", "10", "--per-class", "2"]) == 0
    assert len(rows()) == 20 and all(r["psnr"] != -1.0 for r in rows())  # more pairs: evaluated again, all of them
    mark()
    assert main([*argv, "--steps", "10", "--per-class", "1"]) == 0
    assert len(rows()) == 10 and all(r["psnr"] != -1.0 for r in rows())  # fewer pairs: evaluated again
    mark()
    before = (out / "rows.jsonl").read_text()
    capsys.readouterr()
    for setting, expected in ((["--steps", "12"], "was evaluated with T 10, not 12"),
                              (["--steps", "10", "--guidance", "3"], "was evaluated with guidance 2.0, not 3.0"),
                              (["--steps", "10", "--sigmas", "shifted"], "with sigmas 'linear', not 'shifted'")):
        assert main([*argv, *setting, "--per-class", "1"]) == 2
        assert expected in capsys.readouterr().err
        assert (out / "rows.jsonl").read_text() == before


def test_eval_output_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["eval", "--budgets", "5", "--mechanisms", "reuse", "--out", str(blocker / "sub")]) == 2
    _check_one_line(capsys, r"output folder .* is not writable")


@pytest.fixture
def policy_folder(tmp_path):
    """An untrained (uniform Plackett-Luce) policy for T = 10, budgets 2-6: enough to test the command line."""
    from recache.policies import ReCacheConfig, ReCachePolicy

    folder = tmp_path / "policy"
    ReCachePolicy(ReCacheConfig(T=10, k_min=2, k_max=6, mechanism="hicache")).save_pretrained(folder)
    return folder


def test_sample_and_eval_with_a_policy(capsys, tmp_path, policy_folder):
    out = tmp_path / "grid.png"
    assert main(["sample", "--policy", str(policy_folder), "--budget", "4", "--steps", "10", "--classes", "3",
                 "--per-class", "1", "--out", str(out)]) == 0
    assert "realised full passes per sample: 4 (hicache, recache schedule" in capsys.readouterr().out
    ev = tmp_path / "ev"
    assert main(["eval", "--steps", "10", "--budgets", "3,5", "--mechanisms", "reuse", "--policy", str(policy_folder),
                 "--per-class", "1", "--timing-runs", "0", "--pairs", "calibration", "--out", str(ev)]) == 0
    rows = [json.loads(line) for line in (ev / "rows.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["mechanism"]) for r in rows} == {("uniform", "reuse"), ("recache", "hicache")}
    assert max(r["seed"] for r in rows) < 900_000
    assert all(r["full_passes"] == r["k"] for r in rows)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["paired"] == []  # the policy runs hicache, uniform only reuse: nothing to pair


def test_eval_pairs_a_policy_with_uniform(capsys, tmp_path, policy_folder):
    ev = tmp_path / "ev"
    assert main(["eval", "--steps", "10", "--budgets", "4", "--mechanisms", "hicache", "--policy", str(policy_folder),
                 "--nested", "--per-class", "1", "--timing-runs", "0", "--out", str(ev)]) == 0
    paired = json.loads((ev / "summary.json").read_text())["paired"]
    assert [(e["policy"], e["k"], e["n"]) for e in paired] == [("recache-nested", 4, 10)]
    assert paired[0]["rel_l2"]["verdict"] in ("better", "worse", "tie")
    assert "Paired against the uniform schedule" in (ev / "summary.md").read_text()


@pytest.mark.parametrize("extra, pattern", [
    (["--budget", "9"], r"budget 9 is outside the policy's trained range 2-6; .*--allow-extrapolate"),
    (["--budget", "4", "--mechanism", "reuse"], r"was trained for mechanism = hicache, not reuse"),
    (["--budget", "4", "--steps", "12"], r"was trained for T = 10, not 12"),
    ([], r"--policy needs --budget"),
])
def test_policy_errors(capsys, tmp_path, policy_folder, extra, pattern):
    argv = ["sample", "--policy", str(policy_folder), "--steps", "10", *extra, "--out", str(tmp_path / "x.png")]
    if "--steps" in extra:
        argv = ["sample", "--policy", str(policy_folder), *extra, "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    _check_one_line(capsys, pattern)
    assert not (tmp_path / "x.png").exists()


def test_policy_extrapolation_when_allowed(capsys, tmp_path, policy_folder):
    assert main(["sample", "--policy", str(policy_folder), "--steps", "10", "--budget", "8", "--allow-extrapolate",
                 "--classes", "1", "--per-class", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert "realised full passes per sample: 8" in capsys.readouterr().out


def test_missing_policy(capsys, tmp_path):
    assert main(["sample", "--policy", str(tmp_path / "nope"), "--budget", "4", "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"is not a policy folder \(config.json is missing\) nor a shipped policy")


@pytest.mark.parametrize("argv, pattern", [
    (["train", "--alpha", "-1"], r"--alpha: -1 is not a finite number >= 0"),
    (["train", "--lr", "0"], r"--lr: 0 is not a number > 0"),
    (["train", "--fidelity", "lpip"], r"--fidelity: invalid choice: 'lpip'"),
    (["train", "--updates", "0"], r"--updates: 0 is not a whole number >= 1"),
    (["train", "--train-steps", "20,x"], r"--train-steps: '20,x' is not a comma-separated list of whole numbers"),
])
def test_bad_training_arguments(capsys, argv, pattern):
    _fails(capsys, argv, pattern)


def test_train_refuses_bad_settings_before_writing(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--trainer", "reinforce", "--group", "1", "--out", str(out)]) == 2
    _check_one_line(capsys, r"group must be >= 2")
    assert main(["train", "--trainer", "reinforce", "--k-max", "60", "--out", str(out)]) == 2
    _check_one_line(capsys, r"budget k=60 is not allowed")
    assert main(["train", "--k-max", "20", "--out", str(out)]) == 2  # the default trainer (expert) has no --k-max
    _check_one_line(capsys, r"--k-max needs --trainer reinforce")
    assert main(["train", "--trainer", "reinforce", "--rounds", "3", "--out", str(out)]) == 2
    _check_one_line(capsys, r"--rounds needs --trainer expert")
    assert main(["train", "--train-shifts", "0,3", "--out", str(out)]) == 2
    _check_one_line(capsys, r"trained grid shifts must be in \(0, 100\], got \[0.0, 3.0\]")
    assert main(["train", "--screen-pairs", "8", "--out", str(out)]) == 2  # 8 pairs by default: 0-7 may screen
    _check_one_line(capsys, r"screen_pairs must be from 0 \(off\) to pairs - 1 = 7 and promote >= 1, got 8 and 4")
    assert main(["train", "--trainer", "reinforce", "--screen-pairs", "2", "--out", str(out)]) == 2
    _check_one_line(capsys, r"--screen-pairs needs --trainer expert")
    assert not out.exists()

import json
import shutil
import subprocess
import sys

import pytest

from recache.cli import main
from recache.models.pretrained import WEIGHTS_DIR
from recache.schedule import Schedule


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
    (["sample", "--budget", "0"], r"--budget: 0 is not a whole number >= 1"),
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
    (["sample", "--budget", "51"], r"budget k=51 is not allowed: use a whole number of full passes from 1 to T=50"),
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
    _check_one_line(capsys, r"is for T=20 steps, but this run has T=50")
    assert main(["sample", "--schedule", str(other), "--budget", "3", "--steps", "20", "--out", str(tmp_path / "x.png")]) == 2
    _check_one_line(capsys, r"either --budget or --schedule")
    assert not (tmp_path / "x.png").exists()


def test_sample_with_budget_reports_realised_passes(capsys, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--budget", "4", "--steps", "12", "--mechanism", "taylorseer", "--classes", "2", "--per-class", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "realised full passes per sample: 4 (taylorseer, computed steps [0, 4, 7, 11])" in text
    assert out.is_file()


def test_eval_writes_rows_table_and_plot(capsys, tmp_path):
    schedule = tmp_path / "mine.json"
    Schedule.from_steps(10, [0, 1, 5]).save(schedule)
    out = tmp_path / "ev"
    assert main(["eval", "--steps", "10", "--budgets", "3", "--mechanisms", "reuse,step-skip", "--schedule", str(schedule),
                 "--per-class", "1", "--timing-runs", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 10
    assert {r["policy"] for r in rows} == {"uniform", "file:mine"}
    assert all(r["full_passes"] == 3 and r["k"] == 3 for r in rows)
    assert min(r["seed"] for r in rows) >= 900_000
    table = (out / "summary.md").read_text()
    assert "| uniform | reuse | 3 / 10 | 3 |" in table and "| file:mine | step-skip | 3 / 10 | 3 |" in table
    assert (out / "quality_vs_budget.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_output_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["eval", "--budgets", "5", "--mechanisms", "reuse", "--out", str(blocker / "sub")]) == 2
    _check_one_line(capsys, r"output folder .* is not writable")

import shutil
import subprocess
import sys

import pytest

from recache.cli import main
from recache.models.pretrained import WEIGHTS_DIR


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

import json

import pytest
import torch

from recache.errors import RecacheError
from recache.models.classifier import DigitClassifier
from recache.models.dit import DiT
from recache.models.pretrained import (
    EMBEDDED_MODELS,
    load_classifier,
    load_dit,
    load_pretrained,
    read_config,
    save_pretrained,
)


def test_embedded_weights_load_in_eval_mode():
    dit, clf = load_dit(), load_classifier()
    assert isinstance(dit, DiT) and not dit.training
    assert isinstance(clf, DigitClassifier) and not clf.training
    assert read_config("mnist-dit")["sampling"]["steps"] == 50
    assert set(EMBEDDED_MODELS) == {"mnist-dit", "mnist-classifier"}


def test_round_trip(tiny_dit, tmp_path):
    save_pretrained(tiny_dit, tmp_path, "dit", {"note": "x"})
    loaded = load_dit(tmp_path)
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor(0.3), torch.tensor([1, 2])
    assert torch.equal(loaded(x, s, y), tiny_dit(x, s, y))
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_name():
    with pytest.raises(RecacheError, match="unknown model 'nope'.*mnist-dit"):
        load_dit("nope")


def test_wrong_kind():
    with pytest.raises(RecacheError, match="is a classifier, expected a dit"):
        load_dit("mnist-classifier")


def test_missing_weights(tiny_dit, tmp_path):
    save_pretrained(tiny_dit, tmp_path, "dit")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(RecacheError, match="weights file .* is missing"):
        load_dit(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_corrupt_weights(tiny_dit, tmp_path, content):
    save_pretrained(tiny_dit, tmp_path, "dit")
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(RecacheError, match="corrupt"):
        load_dit(tmp_path)


def test_truncated_weights(tiny_dit, tmp_path):
    save_pretrained(tiny_dit, tmp_path, "dit")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RecacheError, match="corrupt"):
        load_dit(tmp_path)


def test_weights_for_another_config(tiny_dit, tmp_path):
    save_pretrained(tiny_dit, tmp_path, "dit")
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecacheError, match="does not match"):
        load_dit(tmp_path)


def test_non_finite_weights(tiny_dit, tmp_path):
    with torch.no_grad():
        tiny_dit.final_layer.linear.bias[0] = float("nan")
    save_pretrained(tiny_dit, tmp_path, "dit")
    with pytest.raises(RecacheError, match="non-finite"):
        load_dit(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"kind": "unet", "config": {}}',
                                  '{"kind": "dit", "config": {"depth": "x"}}'])
def test_bad_config(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RecacheError, match="config"):
        load_pretrained(tmp_path)

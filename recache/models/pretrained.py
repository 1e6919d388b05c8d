"""Save and load the embedded models: ``model.safetensors`` + ``config.json`` per folder, never pickle.

The trained weights ship inside the package under ``recache/models/weights/<name>/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from recache._version import __version__
from recache.errors import RecacheError
from recache.io import check_regular, first_non_finite, read_json, state_mismatch, write_json, write_safetensors
from recache.models.classifier import ClassifierConfig, DigitClassifier
from recache.models.dit import DiT, DiTConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_MODELS = {"mnist-dit": "dit", "mnist-classifier": "classifier"}
_KINDS = {"dit": (DiT, DiTConfig), "classifier": (DigitClassifier, ClassifierConfig)}


def save_pretrained(model: nn.Module, folder: str | Path, kind: str, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (``kind``, architecture config, anything in ``extra``)."""
    folder = Path(folder)
    write_safetensors(folder / "model.safetensors", model.state_dict())
    write_json(folder / "config.json", {"kind": kind, "config": model.config.to_dict(), "recache_version": __version__,
                                        **(extra or {})})


def resolve(name_or_folder: str | Path) -> Path:
    """The folder of an embedded model name (``mnist-dit``, ``mnist-classifier``) or of a saved model."""
    if str(name_or_folder) in EMBEDDED_MODELS:
        return WEIGHTS_DIR / str(name_or_folder)
    folder = Path(name_or_folder)
    if str(name_or_folder) == "mnist-flux" or (folder / "recache.json").is_file():
        raise RecacheError(f"{name_or_folder} is a diffusers FLUX pipeline, not an embedded DiT: give it as "
                           f"--pipeline {name_or_folder} (train, search) or use recache.enable on it")
    if not (folder / "config.json").is_file():
        raise RecacheError(f"unknown model {str(name_or_folder)!r}: use one of {', '.join(EMBEDDED_MODELS)} "
                           "or a folder with config.json and model.safetensors")
    return folder


def read_config(name_or_folder: str | Path) -> dict:
    """The parsed ``config.json`` of a model, with clear errors for a missing or malformed file."""
    path = resolve(name_or_folder) / "config.json"
    config = read_json(path, "model config")
    if not isinstance(config, dict) or config.get("kind") not in _KINDS or not isinstance(config.get("config"), dict):
        raise RecacheError(f"model config {path} needs 'kind' (one of {', '.join(_KINDS)}) and a 'config' object")
    return config


def load_pretrained(name_or_folder: str | Path, kind: str | None = None) -> nn.Module:
    """Build a model from its folder and load its weights, in eval mode; ``kind`` checks what it must be."""
    folder = resolve(name_or_folder)
    config = read_config(folder)
    if kind is not None and config["kind"] != kind:
        raise RecacheError(f"model {str(name_or_folder)!r} is a {config['kind']}, expected a {kind}")
    model_cls, config_cls = _KINDS[config["kind"]]
    try:
        model = model_cls(config_cls(**config["config"]))
    except (TypeError, ValueError) as e:
        raise RecacheError(f"model config in {folder} is invalid ({e})") from None
    weights = folder / "model.safetensors"
    if not os.path.exists(weights):
        raise RecacheError(f"weights file {weights} is missing (retrain with 'make weights')")
    check_regular(weights, "weights file")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RecacheError(f"weights file {weights} is corrupt or not safetensors ({e})") from None
    if (mismatch := state_mismatch(model, state)) is not None:
        raise RecacheError(f"weights file {weights} does not match its config.json ({mismatch})")
    model.load_state_dict(state, strict=True)
    if (bad := first_non_finite(state)) is not None:
        raise RecacheError(f"weights file {weights} holds non-finite values in {bad}")
    return model.eval()


def load_dit(name_or_folder: str | Path = "mnist-dit") -> DiT:
    return load_pretrained(name_or_folder, kind="dit")


def load_classifier(name_or_folder: str | Path = "mnist-classifier") -> DigitClassifier:
    return load_pretrained(name_or_folder, kind="classifier")

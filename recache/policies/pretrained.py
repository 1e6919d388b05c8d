"""Policy folders on disk and the shipped ones: ``config.json`` + ``model.safetensors``, never pickle.

Shipped policies live in ``pretrained/<model>-<mechanism>`` beside this file and load by name. Files are written
atomically (temporary file, then rename); reading checks what a damaged or foreign folder could hold.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from recache.errors import RecacheError
from recache.io import check_regular, first_non_finite, read_json, state_mismatch, write_json, write_safetensors

PRETRAINED_DIR = Path(__file__).parent / "pretrained"  # shipped policies, by name: <model>-<mechanism>
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def shipped_policies() -> list[str]:
    return sorted(config.parent.name for config in PRETRAINED_DIR.glob(f"*/{CONFIG}"))


def resolve_policy(name_or_folder: str | Path) -> Path:
    """A policy folder, or the folder of a shipped policy with that name."""
    folder = Path(name_or_folder)
    if (folder / CONFIG).exists() or not (PRETRAINED_DIR / str(name_or_folder) / CONFIG).exists():
        return folder
    return PRETRAINED_DIR / str(name_or_folder)


def write_policy(folder: str | Path, state: dict[str, torch.Tensor], config: dict) -> None:
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS, {k: v.contiguous() for k, v in state.items()})
    write_json(folder / CONFIG, config)


def read_policy_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a policy folder (an object), or one clear error."""
    if not (folder / CONFIG).exists():
        raise RecacheError(f"{folder} is not a policy folder (config.json is missing) nor a shipped policy: "
                           f"{', '.join(shipped_policies()) or 'none shipped'}")
    raw = read_json(folder / CONFIG, "policy config")
    if not isinstance(raw, dict):
        raise RecacheError(f"{folder}/config.json is not a valid ReCache policy config (not a ReCache policy config)")
    return raw


def load_policy_weights(policy: torch.nn.Module, folder: Path) -> None:
    """Load ``model.safetensors`` into ``policy``: every tensor present, of the right shape, floating point, finite."""
    weights = folder / WEIGHTS
    check_regular(weights, "policy weights")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise RecacheError(f"policy weights {weights} cannot be loaded ({reason})") from None
    if (mismatch := state_mismatch(policy, state)) is not None:
        raise RecacheError(f"policy weights {weights} cannot be loaded ({mismatch})")
    policy.load_state_dict(state)
    if (bad := next((name for name, t in state.items() if not t.is_floating_point()), None)) is not None:
        raise RecacheError(f"policy weights {weights} hold {state[bad].dtype} in {bad}")
    if (bad := first_non_finite(state)) is not None:
        raise RecacheError(f"policy weights {weights} hold non-finite values in {bad}")

"""Training checkpoints without pickle: tensors in safetensors, counters and optimiser settings in its metadata.

Written atomically, so a run killed mid-write keeps the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from recache.errors import RecacheError
from recache.io import check_regular, first_non_finite, write_safetensors


def save_checkpoint(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator], step: int, extra: dict | None = None) -> None:
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        tensors.update({f"optim.{idx}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors.update({f"rng.{name}": g.get_state() for name, g in generators.items()})
    meta = {"step": step, "param_groups": opt["param_groups"], "extra": extra or {}}
    write_safetensors(path, tensors, metadata={"recache": json.dumps(meta)})


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator]) -> tuple[int, dict]:
    """Restore everything in place; returns the step to continue from and the ``extra`` dict."""
    check_regular(path, "checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["recache"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise RecacheError(f"checkpoint {path} cannot be read ({e}); delete it to start afresh") from None
    if (bad := first_non_finite(tensors)) is not None:
        raise RecacheError(f"checkpoint {path} holds non-finite values in {bad}; delete it to start afresh")
    try:
        _restore(tensors, meta, modules, optimizer, generators)
        return int(meta["step"]), dict(meta["extra"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise RecacheError(f"checkpoint {path} does not fit this run "
                           f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); "
                           "delete it to start afresh") from None


def _restore(tensors: dict, meta: dict, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             generators: dict[str, torch.Generator]) -> None:
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
